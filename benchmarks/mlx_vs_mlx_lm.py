"""``quantkit mlx`` against mlx-lm's own ``mlx_lm convert -q`` on a real-shape checkpoint (`real_shapes.py`: the
shapes and tokenizer of a published 0.5-1.2B model, random bf16 weights).

Each round runs, in fresh processes and alternating the order:

* ``quantkit mlx CKPT --bits 4`` into a fresh workspace (the pipeline verifies the artifact: it loads it in mlx-lm,
  checks the tokenizer against the original's and the logits on 128 tokens);
* quantkit without verification: the same plan run up to the conversion step (``make(..., only=...)``);
* the reference: ``python -m mlx_lm convert --hf-path CKPT --mlx-path OUT -q`` (4 bits, group size 64).

The real-shape configs carry ``rope_theta`` and ``torch_dtype`` at the top level, so quantkit's config fix changes
nothing there and the files must be identical to the reference's (checked: sha256 of every file but mlx-lm's README).
Wall time from the parent's clock; peak RSS of the largest process (``/usr/bin/time -v``) and summed over the
process tree (quantkit runs mlx_lm.convert in a child); medians over rounds.

    .venv/bin/python benchmarks/mlx_vs_mlx_lm.py [--model qwen25-0.5b] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import real_shapes  # noqa: E402
from common import PYTHON, WORK, Run, measure, mib, print_summary, table  # noqa: E402

OUT = WORK / "mlx"

NO_VERIFY = """
import sys
from pathlib import Path
from quantkit.backends.base import JobContext
from quantkit.backends.mlx import MLXOptions
from quantkit.pipeline import make
from quantkit.source import load_local
from quantkit.workspace import Workspace
src, ws = Path(sys.argv[1]), Workspace(Path(sys.argv[2]))
ctx = JobContext.of(load_local(src, name=src.name, source=str(src)), ws)
make(ctx, "mlx", MLXOptions(bits=[4]), only={"model/resolve", "mlx/quantize/4bit"})
"""


def files(folder: Path) -> dict[str, str]:
    from quantkit.files import file_sha256

    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "README.md"}


def one_round(ckpt: Path, order: list[str]) -> dict[str, Run]:
    """One run of each side, in `order`; outputs checked to be identical."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    cmds = {
        "quantkit mlx (verified)": [PYTHON, "-m", "quantkit.cli.app", "mlx", str(ckpt), "--bits", "4", "-w",
                                    str(OUT / "ws-verified"), "--json", "-q"],
        "quantkit mlx (no verify)": [PYTHON, "-c", NO_VERIFY, str(ckpt), str(OUT / "ws-noverify")],
        "mlx_lm convert -q": [PYTHON, "-m", "mlx_lm", "convert", "--hf-path", str(ckpt), "--mlx-path",
                              str(OUT / "mlx_lm"), "-q"],
    }
    runs = {}
    for name in order:
        for stale in ("ws-verified", "ws-noverify", "mlx_lm"):
            shutil.rmtree(OUT / stale, ignore_errors=True)
        runs[name] = measure(cmds[name], env=env)
        print(f"  {name}: {runs[name].wall_s:.1f} s, peak {mib(runs[name].peak_rss):.0f} MiB "
              f"(tree {mib(runs[name].tree_rss):.0f} MiB)", flush=True)
        if name == "mlx_lm convert -q":
            ref = files(OUT / "mlx_lm")
        else:
            made = files(OUT / ("ws-verified" if "verified" in name else "ws-noverify") / "mlx" / "4bit")
            runs[name].extra = {"files": made}
    for name, run in runs.items():
        if run.extra.get("files") is not None and run.extra["files"] != ref:
            raise SystemExit(f"{name} wrote different files from mlx_lm convert")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen25-0.5b", choices=sorted(real_shapes.SHAPES))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    ckpt = real_shapes.build(args.model)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"{ckpt.name}; {common.machine()}", flush=True)
    names = ["quantkit mlx (verified)", "quantkit mlx (no verify)", "mlx_lm convert -q"]
    rounds = []
    for i in range(args.repeat):
        order = names if i % 2 == 0 else names[::-1]
        print(f"round {i + 1}: {', '.join(order)}", flush=True)
        rounds.append(one_round(ckpt, order))
    ref = statistics.median(r["mlx_lm convert -q"].wall_s for r in rounds)
    rows = []
    for name in names:
        wall = statistics.median(r[name].wall_s for r in rounds)
        rows.append([name, f"{wall:.1f}", f"{wall / ref:.2f}x",
                     f"{mib(statistics.median(r[name].peak_rss for r in rounds)):.0f}",
                     f"{mib(statistics.median(r[name].tree_rss for r in rounds)):.0f}"])
    print()
    print(table(rows, ["command", "wall s", "vs mlx_lm", "peak RSS MiB", "tree RSS MiB"]))
    print_summary([("identical files to mlx_lm convert", True)])


if __name__ == "__main__":
    main()
