"""The whole ``quantkit gguf`` command, as a user runs it, against llama.cpp's own tools on real-size checkpoints.

Checkpoints: `real_shapes.py` (real-size vocabularies: Qwen2, Llama-3, tekken, SentencePiece 32k and 129k;
0.5–1.2B parameters of random bf16 weights).
Each round runs, in fresh processes and alternating the order:

* ``quantkit gguf CKPT --q8_0 --no-imatrix`` (verification on) into a fresh workspace;
* the same with ``--no-verify``;
* the reference: ``python convert_hf_to_gguf.py CKPT --outtype bf16`` then ``llama-quantize BF16 Q8_0``
  (wall times added, peak memory the larger of the two).

Then the importance matrix on the same calibration rows (``--calib-samples`` × 512 tokens of builtin:ru-mix):
quantkit's imatrix step (a process that tokenizes the rows and runs ``compute_imatrix``; it reports its compute
time) against ``llama-imatrix -c 512 --chunks N --no-ppl`` on the BF16 GGUF, fed the rows decoded to text (what
``quantkit.calibration.export_text`` writes for llama.cpp). With ``--imatrix-command`` also the whole
``quantkit gguf CKPT --q4_k_m --calib-samples N --no-verify`` against convert + llama-imatrix + llama-quantize.

Both sides use every core this process may use. Wall time from the parent's clock, peak RSS from
``/usr/bin/time -v`` (its largest process) and, beside it, the largest RSS summed over the command's process tree
(sampled every 20 ms: verification runs a worker process beside the main one); ratios are medians of per-round
ratios.

    .venv/bin/python benchmarks/whole_command.py [--model qwen25-0.5b] [--repeat 3] [--calib-samples 16]
        [--skip-convert] [--skip-imatrix] [--imatrix-command]

Targets (issue 18): verified command ≤ 1.0× convert + quantize; ``--no-verify`` ≤ 0.5×; imatrix ≤ 0.3×
llama-imatrix.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import real_shapes  # noqa: E402
from common import PYTHON, ROOT, WORK, Run, measure, mib, print_summary, table, verdict  # noqa: E402

OUT = WORK / "whole"
QUANTKIT = ROOT / ".venv" / "bin" / "quantkit"
TARGETS = {"verified": 1.0, "no-verify": 0.5, "imatrix": 0.3}

QUANTKIT_IMATRIX_STEP = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from transformers import AutoTokenizer
from quantkit.backends.gguf.steps import _adds_bos
from quantkit.backends.gguf.quantize.imatrix import compute_imatrix, write_imatrix
from quantkit.calibration import export_text, token_rows
from quantkit.source import load_local
src, out, n, text = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ckpt = load_local(src, name=src.name, source=str(src))
tok = AutoTokenizer.from_pretrained(src)
rows = token_rows("builtin:ru-mix", tok, n_samples=n, seq_len=512, seed=0, chat=False)
if text != "-":
    export_text(rows, tok, Path(text))
t1 = time.perf_counter()
sums, counts = compute_imatrix(ckpt, rows, bos=tok.bos_token_id if _adds_bos(tok) else None)
t2 = time.perf_counter()
write_imatrix(out, sums, counts, datasets=["builtin:ru-mix"], chunk_size=512)
print(json.dumps({"setup_s": t1 - t0, "compute_s": t2 - t1}))
"""


def threads() -> int:
    from quantkit.threads import cores

    return cores()


def quantkit_cmd(ckpt: Path, ws: Path, *flags: str) -> Run:
    common.clean(ws)
    run = measure([str(QUANTKIT), "gguf", str(ckpt), "-w", str(ws), "-q", *flags])
    common.clean(ws)
    return run


def reference(ckpt: Path, tag: str, *, keep: bool = False, imatrix_text: Path | None = None,
              n_chunks: int = 0, ftype: str = "Q8_0") -> Run:
    """convert_hf_to_gguf.py (+ llama-imatrix) + llama-quantize, as one Run: walls added, peak the largest."""
    bf16, quant, imat = OUT / f"{tag}-BF16.gguf", OUT / f"{tag}-{ftype}.gguf", OUT / f"{tag}-imatrix.gguf"
    runs = [measure([PYTHON, str(common.llama_cpp_dir() / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "bf16",
                     "--outfile", str(bf16)])]
    extra: list[str] = []
    if imatrix_text is not None:
        runs.append(llama_imatrix(bf16, imatrix_text, imat, n_chunks))
        extra = ["--imatrix", str(imat)]
    runs.append(measure([str(common.tool("llama-quantize")), *extra, str(bf16), str(quant), ftype, str(threads())],
                        env=common.tool_env()))
    for f in (quant, imat) if keep else (bf16, quant, imat):
        common.clean(f)
    return Run(sum(r.wall_s for r in runs), max(r.peak_rss for r in runs), 0, "", "",
               {"parts_s": [round(r.wall_s, 2) for r in runs]}, tree_rss=max(r.tree_rss for r in runs))


def llama_imatrix(bf16: Path, text: Path, out: Path, n_chunks: int) -> Run:
    return measure([str(common.tool("llama-imatrix")), "-m", str(bf16), "-f", str(text), "-o", str(out), "-c", "512",
                    "--chunks", str(n_chunks), "--no-ppl", "-t", str(threads())], env=common.tool_env())


def summarize(runs: dict[str, list[Run]], base: str, targets: dict[str, float]) -> tuple[str, list[tuple[str, bool]]]:
    med = statistics.median
    rows, results = [], []
    ref = runs[base]
    for name, rs in runs.items():
        ratio = common.median_ratio([r.wall_s for r in rs], [r.wall_s for r in ref])
        mem = common.median_ratio([r.peak_rss for r in rs], [r.peak_rss for r in ref])
        target = targets.get(name)
        rows.append([name, f"{med(r.wall_s for r in rs):.2f}", f"{min(r.wall_s for r in rs):.2f}",
                     f"{ratio:.2f}×", f"{mib(med(r.peak_rss for r in rs)):.0f}", f"{mem:.2f}×",
                     f"{mib(med(r.tree_rss for r in rs)):.0f}",
                     f"≤ {target}×" if target else "", verdict(ratio <= target) if target else ""])
        if target:
            results.append((f"{name}: {ratio:.2f}× {base} (≤ {target}×)", ratio <= target))
    text = table(rows, ["command", "wall median (s)", "wall min (s)", "ratio", "peak RSS median (MiB)", "RSS ratio",
                        "summed RSS median (MiB)", "target", ""])
    return text, results


def convert_section(ckpt: Path, repeat: int) -> list[tuple[str, bool]]:
    ws = OUT / "ws"
    sides: dict[str, Callable[[int], Run]] = {
        "verified": lambda i: quantkit_cmd(ckpt, ws, "--q8_0", "--no-imatrix"),
        "no-verify": lambda i: quantkit_cmd(ckpt, ws, "--q8_0", "--no-imatrix", "--no-verify"),
        "convert+quantize": lambda i: reference(ckpt, "ref"),
    }
    print(f"\n== quantkit gguf {ckpt.name} --q8_0 --no-imatrix vs convert_hf_to_gguf.py + llama-quantize, "
          f"{repeat} alternating rounds ==")
    runs = common.alternate(sides, repeat)
    text, results = summarize(runs, "convert+quantize", {k: TARGETS[k] for k in ("verified", "no-verify")})
    print(text)
    parts = [r.extra["parts_s"] for r in runs["convert+quantize"]]
    print("reference parts (convert, quantize), median s: "
          + ", ".join(f"{statistics.median(p[i] for p in parts):.2f}" for i in range(len(parts[0]))))
    verify = [v.wall_s - n.wall_s for v, n in zip(runs["verified"], runs["no-verify"], strict=True)]
    print(f"verification's cost (verified − no-verify, median of rounds): {statistics.median(verify):.2f} s")
    return results


def imatrix_section(ckpt: Path, repeat: int, n: int, whole: bool) -> list[tuple[str, bool]]:
    text = OUT / f"calib-{n}.txt"
    bf16 = OUT / "imatrix-ref-BF16.gguf"
    if not bf16.exists():
        reference(ckpt, "imatrix-ref", keep=True)
    ours = OUT / "imatrix-quantkit.gguf"
    measure([PYTHON, "-c", QUANTKIT_IMATRIX_STEP, str(ckpt), str(ours), str(n), str(text)])  # writes the text too
    sides: dict[str, Callable[[int], Run]] = {
        "imatrix": lambda i: measure([PYTHON, "-c", QUANTKIT_IMATRIX_STEP, str(ckpt), str(ours), str(n), "-"]),
        "llama-imatrix": lambda i: llama_imatrix(bf16, text, OUT / "imatrix-llama.gguf", n),
    }
    print(f"\n== importance matrix, {n} × 512 tokens of builtin:ru-mix, {repeat} alternating rounds ==")
    runs = common.alternate(sides, repeat)
    out, results = summarize(runs, "llama-imatrix", {"imatrix": TARGETS["imatrix"]})
    print(out)
    med = statistics.median
    compute = [r.extra["compute_s"] for r in runs["imatrix"]]
    setup = med(r.extra['setup_s'] for r in runs['imatrix'])
    print(f"quantkit's split (median): setup (imports, tokenizing) {setup:.2f}"
          f" s, compute_imatrix {med(compute):.2f} s "
          f"({common.median_ratio(compute, [r.wall_s for r in runs['llama-imatrix']]):.2f}× llama-imatrix's process)")
    if whole:
        ws = OUT / "ws-imatrix"
        sides = {
            "quantkit --q4_k_m": lambda i: quantkit_cmd(ckpt, ws, "--q4_k_m", "--calib-samples", str(n),
                                                        "--no-verify"),
            "convert+imatrix+quantize": lambda i: reference(ckpt, "ref-im", imatrix_text=text, n_chunks=n,
                                                            ftype="Q4_K_M"),
        }
        print(f"\n== whole command with an importance matrix ({n} rows), {repeat} alternating rounds ==")
        print(summarize(common.alternate(sides, repeat), "convert+imatrix+quantize", {})[0])
    common.clean(bf16)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen25-0.5b", choices=sorted(real_shapes.SHAPES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--skip-imatrix", action="store_true")
    ap.add_argument("--imatrix-command", action="store_true", help="also time the whole command with an imatrix")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ckpt = real_shapes.build(args.model)
    print(f"machine: {common.machine()}; {threads()} threads each side; model {ckpt.name}")
    results: list[tuple[str, bool]] = []
    if not args.skip_convert:
        results += convert_section(ckpt, args.repeat)
    if not args.skip_imatrix:
        results += imatrix_section(ckpt, args.repeat, args.calib_samples, args.imatrix_command)
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
