"""quantkit's evaluation (PPL + KL-divergence in one pass) against llama.cpp's ``llama-perplexity``.

Both score the same Q4_K_M of the benchmark model (quantized by quantkit with its importance matrix) on
quantkit's held-out Russian text (``builtin:ru-eval``, documents joined with a blank line, written to a file for
llama-perplexity), in chunks of 512 tokens with the second half of each chunk scored.

* llama-perplexity: ``-m Q4_K_M -f TEXT -c 512 -b 512 --chunks N -t T -tb T`` plus ``--no-repack`` and
  ``-fa on`` when its ``--help`` lists them (without ``--no-repack`` quantized models crash llama.cpp's AMX path
  on CPUs that have it). It tokenizes with llama.cpp's tokenizer and adds BOS.
* quantkit: ``evaluate.eval_tokens`` (HF tokenizer), ``LlamaScorer`` and ``evaluate.score`` against a bf16
  reference from ``evaluate.compute_reference``. The reference is computed once, before timing; the timed part
  is the scoring pass: loading the GGUF into a llama.cpp context and ``score()`` (PPL, KLD, top-1 in one pass).
  The whole child process (python start, imports, tokenizing, reading the reference) is shown too.

Both sides alternate in fresh processes, with the same thread count.

    .venv/bin/python benchmarks/perplexity_vs_llama_perplexity.py [--repeat 3] [--chunks 12]

Targets: perplexities within 1% of each other; quantkit's scoring pass ≤ 1.0× llama-perplexity's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import PYTHON, WORK, measure, mib, print_summary, table, verdict  # noqa: E402

OUT = WORK / "perplexity"
N_CTX = 512
PPL_TARGET = 0.01
TIME_TARGET = 1.0

SETUP = """
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from quantkit.backends.gguf.llamacpp import LlamaModel
from quantkit.calibration import load
from quantkit.quality.evaluate import compute_reference, eval_tokens
from quantkit.source import load_local
ckpt_path, gguf_path, text_path, ref_path, chunks = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), \\
    Path(sys.argv[4]), int(sys.argv[5])
text = "\\n\\n".join(d.plain() for d in load("builtin:ru-eval").documents)
text_path.write_text(text, encoding="utf-8")
tok = AutoTokenizer.from_pretrained(ckpt_path)
hf = tok(text)["input_ids"]
model = LlamaModel(gguf_path, vocab_only=True)
cpp = model.tokenize(text, add_special=True)
model.close()
ckpt = load_local(ckpt_path, name=ckpt_path.name, source=str(ckpt_path))
toks = eval_tokens(ckpt, "builtin:ru-eval", N_CTX, chunks, tok)
ref = compute_reference(ckpt, toks)
ref.save(ref_path)
print(json.dumps({"hf_tokens": len(hf), "llama_tokens": len(cpp), "same_tokens": hf == cpp,
                  "chunks": int(toks.chunks.shape[0]), "ref_ppl": ref.ppl, "kld_mode": ref.mode}))
""".replace("N_CTX", str(N_CTX))

QUANTKIT_SCORE = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from quantkit.backends.gguf.llamacpp import LlamaScorer
from quantkit.quality.evaluate import Reference, eval_tokens, score
from quantkit.source import load_local
ckpt_path, gguf_path, ref_path, chunks = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
ckpt = load_local(ckpt_path, name=ckpt_path.name, source=str(ckpt_path))
toks = eval_tokens(ckpt, "builtin:ru-eval", N_CTX, chunks)
ref = Reference.load(ref_path)
t1 = time.perf_counter()
scorer = LlamaScorer(gguf_path, n_ctx=N_CTX)
t2 = time.perf_counter()
result = score(scorer, toks, ref)
scorer.close()
t3 = time.perf_counter()
print(json.dumps({**result, "prep_s": t1 - t0, "load_s": t2 - t1, "pass_s": t3 - t1}))
""".replace("N_CTX", str(N_CTX))


def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def llama_perplexity_cmd(model: Path, text: Path, chunks: int) -> list[str]:
    help_text = common.tool_help("llama-perplexity")
    cmd = [str(common.tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(N_CTX),
           "-b", str(N_CTX), "--chunks", str(chunks), "-t", str(threads()), "-tb", str(threads())]
    if "--no-repack" in help_text:
        cmd.append("--no-repack")
    if "--flash-attn" in help_text:
        cmd += ["-fa", "on"]
    return cmd


def parse_llama_perplexity(out: str) -> dict[str, float]:
    res: dict[str, float] = {}
    if m := re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out):
        res["ppl"], res["ppl_err"] = float(m.group(1)), float(m.group(2))
    if m := re.search(r"calculating perplexity over (\d+) chunks", out):
        res["chunks"] = int(m.group(1))
    # log records carry a m.ss.mmm.uuu timestamp (not always at a line start: the progress line's tail goes to
    # stdout); the chunk loop runs from "calculating" to "Final estimate"
    stamp = r"(\d+)\.(\d\d)\.(\d{3})\.(\d{3}) I "
    begin = re.search(stamp + r"perplexity: calculating", out)
    end = re.search(stamp + r"Final estimate", out)
    if begin and end:
        def secs(m: re.Match[str]) -> float:
            return int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6

        res["loop_s"] = secs(end) - secs(begin)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=12, help="chunks of 512 tokens to score (default 12)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ckpt, model = common.bench_checkpoint(), common.bench_q4km_gguf()
    text, ref_path = OUT / "ru-eval.txt", OUT / f"reference-{args.chunks}.npz"
    info_path = ref_path.with_suffix(".json")
    stamp = (ckpt / "benchmark-spec.json").read_text()
    if not (ref_path.exists() and info_path.exists() and json.loads(info_path.read_text()).get("spec") == stamp
            and text.exists()):
        print(f"computing the bf16 reference over {args.chunks} chunks (transformers; not timed) …", flush=True)
        setup = common.run_python(SETUP, str(ckpt), str(model), str(text), str(ref_path), str(args.chunks))
        info_path.write_text(json.dumps({**setup.extra, "spec": stamp}))
    info = json.loads(info_path.read_text())
    print(f"machine: {common.machine()}; {threads()} threads each side")
    print(f"model: {model.name} ({mib(model.stat().st_size):.0f} MiB); text: {text.name}, {info['hf_tokens']:,} "
          f"tokens (HF) / {info['llama_tokens']:,} (llama.cpp), identical token ids: {info['same_tokens']}; "
          f"{info['chunks']} chunks of {N_CTX}; bf16 reference PPL {info['ref_ppl']:.3f} ({info['kld_mode']})")
    cmd = llama_perplexity_cmd(model, text, args.chunks)
    print("llama-perplexity " + " ".join(cmd[1:]))
    print(f"\n== {args.repeat} alternating rounds ==")
    runs = common.alternate({
        "quantkit score": lambda i: measure([PYTHON, "-c", QUANTKIT_SCORE, str(ckpt), str(model), str(ref_path),
                                             str(args.chunks)]),
        "llama-perplexity": lambda i: measure(cmd, env=common.tool_env()),
    }, args.repeat)
    q, r = runs["quantkit score"], runs["llama-perplexity"]
    ours = q[-1].extra
    theirs = parse_llama_perplexity(r[-1].stderr + r[-1].stdout)
    if "ppl" not in theirs:
        print((r[-1].stdout + r[-1].stderr)[-3000:])
        raise SystemExit("could not read llama-perplexity's final estimate")
    rel = ours["ppl"] / theirs["ppl"] - 1.0
    pass_ratio = common.median_ratio([x.extra["pass_s"] for x in q], [x.wall_s for x in r])
    proc_ratio = common.median_ratio([x.wall_s for x in q], [x.wall_s for x in r])
    med = statistics.median
    lp_loop = [parse_llama_perplexity(x.stderr + x.stdout).get("loop_s") for x in r]
    rows = [
        ["perplexity", f"{ours['ppl']:.4f}", f"{theirs['ppl']:.4f} ± {theirs['ppl_err']:.4f}", f"{rel:+.3%}",
         f"within {PPL_TARGET:.0%}", verdict(abs(rel) <= PPL_TARGET)],
        ["chunks scored", ours["chunks"], int(theirs.get("chunks", -1)), "", "", ""],
        ["scoring pass (load + score), median s", f"{med(x.extra['pass_s'] for x in q):.2f}",
         f"{med(x.wall_s for x in r):.2f} (whole process)", f"{pass_ratio:.2f}×", f"≤ {TIME_TARGET}×",
         verdict(pass_ratio <= TIME_TARGET)],
        ["  of which model load, median s", f"{med(x.extra['load_s'] for x in q):.2f}", "", "", "", ""],
        ["whole process, median s", f"{med(x.wall_s for x in q):.2f}", f"{med(x.wall_s for x in r):.2f}",
         f"{proc_ratio:.2f}×", "", ""],
        ["chunk loop only, median s", f"{med(x.extra['seconds'] for x in q):.2f}",
         f"{med(t for t in lp_loop if t is not None):.2f} (log timestamps)" if any(lp_loop) else "n/a",
         f"{common.median_ratio([x.extra['seconds'] for x in q], lp_loop):.2f}×" if all(lp_loop) else "", "", ""],
        ["peak RSS, median MiB", f"{mib(med(x.peak_rss for x in q)):.0f}", f"{mib(med(x.peak_rss for x in r)):.0f}",
         "", "", ""],
    ]
    print(f"\n== {model.name}: quantkit vs llama-perplexity (ratios are medians of per-round ratios) ==")
    print(table(rows, ["", "quantkit", "llama-perplexity", "ratio / diff", "target", ""]))
    print(f"quantkit also measured in the same pass: KLD mean {ours['kld_mean']:.5f}, p99 {ours['kld_p99']:.5f}, "
          f"top-1 agreement {ours['top1']:.2%}, ΔPPL vs bf16 {ours['delta_ppl']:+.2%} (llama-perplexity: PPL only)")
    print("quantkit's peak RSS includes the bf16 reference log-probabilities it holds for the KL-divergence.")
    print_summary([(f"perplexity within {PPL_TARGET:.0%} of llama-perplexity's ({rel:+.3%})", abs(rel) <= PPL_TARGET),
                   (f"scoring pass ≤ {TIME_TARGET}× llama-perplexity's wall time ({pass_ratio:.2f}×)",
                    pass_ratio <= TIME_TARGET)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
