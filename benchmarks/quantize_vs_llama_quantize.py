"""quantkit's ``quantize()`` (llama.cpp's C API through llama-cpp-python) against the ``llama-quantize`` binary.

Both quantize the same BF16 GGUF of the benchmark model (converted by quantkit) to Q4_K_M, without and with the
same importance-matrix file (quantkit's, computed once from builtin:ru-mix). Each side runs in a fresh process,
alternating; quantkit's process imports quantkit, reads the imatrix file (``read_imatrix``) and calls
``quantize()``, which is what ``quantkit gguf --imatrix FILE`` does. Both use the same number of threads (the
CPUs this process may use).

Outputs are compared tensor by tensor (name, type, shape, bytes) and key by key; whole-file hashes are printed
too (llama-quantize records the imatrix file name and chunk counts under ``quantize.imatrix.*``, the C API call
does not, so files with an imatrix are expected to differ in those keys only).

    .venv/bin/python benchmarks/quantize_vs_llama_quantize.py [--repeat 3] [--type Q4_K_M]

Targets: tensor data identical; quantkit ≤ 1.05× llama-quantize's wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import PYTHON, QUANTKIT_QUANTIZE, WORK, measure, mib, print_summary, table, verdict  # noqa: E402

OUT = WORK / "quantize"
TIME_TARGET = 1.05


def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_quantkit(src: Path, dst: Path, ftype: str, imatrix: Path | None) -> common.Run:
    return measure([PYTHON, "-c", QUANTKIT_QUANTIZE, str(src), str(dst), ftype, str(imatrix) if imatrix else "-"])


def run_llama_quantize(src: Path, dst: Path, ftype: str, imatrix: Path | None) -> common.Run:
    cmd = [str(common.tool("llama-quantize"))]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src), str(dst), ftype, str(threads())]
    return measure(cmd, env=common.tool_env())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--type", default="Q4_K_M")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    src, imatrix = common.bench_bf16_gguf(), common.bench_imatrix()
    print(f"machine: {common.machine()}; {threads()} threads each side")
    print(f"input: {src.name} ({mib(src.stat().st_size):.0f} MiB), imatrix {imatrix.name}")
    results: list[tuple[str, bool]] = []
    rows = []
    notes = []
    for label, im in (("no imatrix", None), ("imatrix", imatrix)):
        print(f"\n== {args.type}, {label}: {args.repeat} alternating rounds ==")
        ours, ref = OUT / f"quantkit-{args.type}.gguf", OUT / f"llama-quantize-{args.type}.gguf"
        runs = common.alternate({
            "quantkit quantize()": lambda i, im=im, o=ours: run_quantkit(src, o, args.type, im),
            "llama-quantize": lambda i, im=im, o=ref: run_llama_quantize(src, o, args.type, im),
        }, args.repeat)
        res = common.compare_gguf(ours, ref)
        same_file = common.file_sha256(ours) == common.file_sha256(ref)
        tensors_ok = not res["tensor_diffs"]
        q, r = runs["quantkit quantize()"], runs["llama-quantize"]
        ratio = common.median_ratio([x.wall_s for x in q], [x.wall_s for x in r])
        inner = [x.extra["work_s"] for x in q if "work_s" in x.extra]
        inner_ratio = common.median_ratio(inner, [x.wall_s for x in r]) if len(inner) == len(r) else float("nan")
        med = statistics.median
        imports = [x.extra["import_s"] for x in q if "import_s" in x.extra]
        rows.append([label, f"{med(x.wall_s for x in q):.2f}", f"{med(imports):.2f}" if imports else "n/a",
                     f"{med(inner):.2f}" if inner else "n/a", f"{med(x.wall_s for x in r):.2f}", f"{ratio:.3f}×",
                     f"{inner_ratio:.3f}×", f"{mib(med(x.peak_rss for x in q)):.0f}",
                     f"{mib(med(x.peak_rss for x in r)):.0f}", f"{mib(ours.stat().st_size):.1f}",
                     "yes" if tensors_ok else f"NO ({len(res['tensor_diffs'])})", "yes" if same_file else "no",
                     verdict(ratio <= TIME_TARGET)])
        for d in res["tensor_diffs"][:10] + res["meta_diffs"][:10]:
            notes.append(f"  {label}: {d}")
        results.append((f"{label}: tensor data identical to llama-quantize's", tensors_ok))
        results.append((f"{label}: whole-process wall time ≤ {TIME_TARGET}× llama-quantize ({ratio:.3f}×)",
                        ratio <= TIME_TARGET))
        results.append((f"{label}: read_imatrix + quantize() call ≤ {TIME_TARGET}× llama-quantize's process "
                        f"({inner_ratio:.3f}×)", inner_ratio <= TIME_TARGET))
        common.clean(ours)
        common.clean(ref)
    print(f"\n== {args.type}: quantkit vs llama-quantize (medians; ratios are medians of per-round ratios) ==")
    print(table(rows, ["", "quantkit s", "imports s", "call s", "llama-quantize s", "wall ratio", "call-only ratio",
                       "quantkit MiB", "llama-q MiB", "out MiB", "tensors identical", "file identical", "wall"]))
    print("wall ratio: whole quantkit process (python start, imports, imatrix read, quantize) / llama-quantize "
          "process; call-only: read_imatrix + quantize() inside the process.")
    if notes:
        print("differences:")
        print("\n".join(notes))
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
