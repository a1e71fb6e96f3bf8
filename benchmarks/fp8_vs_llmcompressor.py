"""FP8_DYNAMIC: quantkit's FP8 step against llm-compressor on a real-shape checkpoint (`real_shapes.py`: real
widths and vocabulary, random bf16 weights): wall time and peak memory of each, side by side, and whether the
tensors they write are bit-identical.

- quantkit: the pipeline's ``fp8/quantize/FP8_DYNAMIC`` step alone (``quantkit fp8 CKPT`` without verification or
  evaluation), in a fresh process;
- llm-compressor ``oneshot`` (load the model in transformers, QuantizationModifier FP8_DYNAMIC, save compressed):
  the reference layout, the one vLLM's docs use;
- llm-compressor ``model_free_ptq`` (safetensors to safetensors), with the embeddings ignored as quantkit does.

llm-compressor runs in its own venv (it pins another transformers and compressed-tensors): pass its python with
``--llmc-python``. The machine may be shared: run it more than once before quoting figures.

    .venv/bin/python benchmarks/fp8_vs_llmcompressor.py [--shape qwen25-0.5b] [--threads 2] \\
        [--llmc-python /tmp/vllm_probe/venv-llmc/bin/python] [--modes oneshot,model_free] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, WORK, Run, measure  # noqa: E402
from real_shapes import build  # noqa: E402

QUANTKIT = """
import json, sys
from pathlib import Path
from quantkit.backends.base import JobContext
from quantkit.backends.fp8 import FP8Options
from quantkit.pipeline import make
from quantkit.source import load_local
from quantkit.workspace import Workspace
src, ws, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ctx = JobContext.of(load_local(src, name=src.name, source=str(src)), Workspace(ws), threads=threads)
(art,) = make(ctx, "fp8", FP8Options(), only={"model/resolve", "fp8/quantize/FP8_DYNAMIC"})
print(json.dumps({"folder": str(art.path)}))
"""

ONESHOT = """
import sys, torch
src, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
"""

MODEL_FREE = """
import sys, torch
src, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
from llmcompressor import model_free_ptq
model_free_ptq(src, out, scheme="FP8_DYNAMIC", ignore=["lm_head", "model.embed_tokens"], device="cpu")
"""

COMPARE = """
import glob, json, sys, torch
from safetensors import safe_open
def handles(folder):
    out = {}
    for f in sorted(glob.glob(folder + "/*.safetensors")):
        h = safe_open(f, "pt")
        out.update({k: h for k in h.keys()})
    return out
a, b = handles(sys.argv[1]), handles(sys.argv[2])
raw = lambda t: t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int16) if t.dtype.itemsize == 2 else t
differ = []
for name in sorted(set(a) & set(b)):
    x, y = a[name].get_tensor(name), b[name].get_tensor(name)
    if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(raw(x), raw(y)):
        differ.append(name)
qa = json.load(open(sys.argv[1] + "/config.json"))["quantization_config"]
qb = json.load(open(sys.argv[2] + "/config.json"))["quantization_config"]
strip = lambda q: {k: v for k, v in q.items() if k != "version"}
print(json.dumps({"common": len(set(a) & set(b)), "only_ours": sorted(set(a) - set(b))[:5],
                  "only_theirs": sorted(set(b) - set(a))[:5], "differ": differ[:5], "n_differ": len(differ),
                  "config_equal": strip(qa) == strip(qb)}))
"""


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_tool(name: str, cmd: list[str]) -> Run:
    print(f"running {name} …", flush=True)
    run = measure(cmd)
    print(f"  {run.wall_s:.1f} s, peak RSS {gib(run.peak_rss)}", flush=True)
    return run


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    got = measure([PYTHON, "-c", COMPARE, str(ours), str(theirs)])
    return dict(got.extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen25-0.5b", help="a real_shapes.py shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llmc-python", default="/tmp/vllm_probe/venv-llmc/bin/python")
    ap.add_argument("--modes", default="oneshot,model_free", help="llm-compressor entry points to time")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object at the end")
    args = ap.parse_args()
    ckpt = build(args.shape)
    work = WORK / "fp8"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint {ckpt.name}: {gib(size)} of bf16 safetensors, {args.threads} threads", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    ours = run_tool("quantkit fp8", [PYTHON, "-c", QUANTKIT, str(ckpt), str(work / "ws"), str(args.threads)])
    ours_dir = Path(ours.extra["folder"])
    rows["quantkit"] = {"wall_s": round(ours.wall_s, 1), "peak_rss": ours.peak_rss, "identical": "—"}
    scripts = {"oneshot": ONESHOT, "model_free": MODEL_FREE}
    for mode in [m for m in args.modes.split(",") if m]:
        out = work / f"llmc-{mode}"
        run = run_tool(f"llm-compressor {mode}", [args.llmc_python, "-c", scripts[mode], str(ckpt), str(out),
                                                 str(args.threads)])
        same = compare(ours_dir, out)
        identical = same["n_differ"] == 0 and not same["only_ours"] and not same["only_theirs"]
        rows[f"llm-compressor {mode}"] = {"wall_s": round(run.wall_s, 1), "peak_rss": run.peak_rss,
                                          "identical": identical, "tensors": same["common"],
                                          "config_equal": same["config_equal"], "detail": same}
    print(f"\n{'tool':<28}{'wall':>9}{'peak RSS':>12}  tensors bit-identical to quantkit's")
    for name, r in rows.items():
        ident = r["identical"] if r["identical"] == "—" else \
            f"{r['identical']} ({r['tensors']} tensors; quantization_config equal: {r['config_equal']})"
        print(f"{name:<28}{r['wall_s']:>8.1f}s{gib(r['peak_rss']):>12}  {ident}")
    if args.json:
        print(json.dumps({"checkpoint": ckpt.name, "bytes": size, "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
