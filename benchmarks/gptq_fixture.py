"""GPTQ on the Llama-3 test fixture: wall time, peak memory and quality of `quantkit gptq` at 4-bit g64.

Builds (once, under benchmarks/_work/) the same tiny Llama-3-style checkpoint the tests use, quantizes it with
`GPTQBackend` into a fresh workspace, and scores bf16 and GPTQ on the held-out Russian eval text (chunks of 512,
second half scored, like llama-perplexity). With the reference on (default), GPTQModel is also run directly on
the same calibration rows, alternating with ours, and the median of ratios says what quantkit adds on top
(tokenizing, a child process, cleaning the folder). The machine is shared: quote medians, not single runs.

    .venv/bin/python benchmarks/gptq_fixture.py [--samples 64 --seq-len 512 --repeat 3 --no-reference --json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "gptq"
TINY = dict(vocab_size=2048, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768)  # as tests/conftest.py
N_CTX = 512

REFERENCE = """
import sys, numpy as np
from gptqmodel import GPTQModel, QuantizeConfig
src, rows, out, offload, group = sys.argv[1:6]
cal = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in np.load(rows)]
qc = QuantizeConfig(bits=4, group_size=int(group), pack_impl="original", offload_to_disk_path=offload)
m = GPTQModel.load(src, qc, device="cpu")
m.quantize(cal, batch_size=1)
m.save(out)
"""


def fixture() -> Path:
    """The tests' Llama-3 fixture, built in a child process so that its training does not count in our memory."""
    out = WORK / "tiny-llama3"
    if not (out / "config.json").exists():
        code = ("import sys; from pathlib import Path; from quantkit.demo import build_checkpoint; "
                f"build_checkpoint(Path(sys.argv[1]), 'llama3', train_steps=120, **{TINY!r})")
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return out


def _children_hwm_kb() -> dict[int, int]:
    """VmHWM (peak resident set since exec) of each child process of this one, from /proc."""
    me, found = os.getpid(), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != me:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                found[int(stat.parent.name)] = int(line.split()[1])
    return found


@contextmanager
def child_peak() -> Iterator[dict[str, float]]:
    """Track the largest VmHWM of any child process while the block runs (sampled every 0.2 s), in MB.

    (`getrusage(RUSAGE_CHILDREN)` would count the parent's resident set at fork time as the child's.)"""
    result = {"mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for kb in _children_hwm_kb().values():
                result["mb"] = max(result["mb"], kb / 1024)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def self_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(src: Path, group: int, samples: int, seq_len: int) -> tuple[float, Path, dict[str, Any]]:
    from quantkit.backends.base import JobContext
    from quantkit.backends.gptq import GPTQOptions
    from quantkit.pipeline import make
    from quantkit.source import resolve
    from quantkit.workspace import Workspace

    ws_root = WORK / "ws"
    shutil.rmtree(ws_root, ignore_errors=True)
    ctx = JobContext.of(resolve(str(src)), Workspace(ws_root), calib_samples=samples,
                     calib_seq_len=seq_len, command="benchmarks/gptq_fixture.py")
    start = time.perf_counter()
    (art,) = make(ctx, "gptq", GPTQOptions(bits=4, group_size=group))
    return time.perf_counter() - start, art.path, {"size": art.size, "bpw": art.bpw}


def run_reference(src: Path, group: int, samples: int, seq_len: int) -> float:
    """GPTQModel alone on the same rows (tokenizing is not timed: it is our step, not GPTQModel's)."""
    from transformers import AutoTokenizer

    from quantkit.calibration import token_rows

    ref = WORK / "ref"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(src))
    np.save(ref / "rows.npy", token_rows("builtin:ru-mix", tok, n_samples=samples, seq_len=seq_len))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), "TMPDIR": str(ref)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", REFERENCE, str(src), str(ref / "rows.npy"), str(ref / "out"),
                    str(ref / "offload"), str(group)], cwd=ref, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def quality(src: Path, quant: Path) -> dict[str, float]:
    """PPL of bf16 and GPTQ over the whole held-out eval text, mean KL(bf16 ‖ GPTQ), top-1 agreement."""
    from transformers import AutoTokenizer

    from quantkit import calibration
    from quantkit.backends.gptq import GPTQBackend, TransformersScorer

    tok = AutoTokenizer.from_pretrained(str(src))
    ids = np.asarray(calibration.token_stream(calibration.load("builtin:ru-eval"), tok, chat=False, seed=0))
    chunks = [ids[c * N_CTX:(c + 1) * N_CTX] for c in range(len(ids) // N_CTX)]

    def log_probs(scorer: Any) -> list[np.ndarray]:
        out = []
        for chunk in chunks:
            x = scorer.chunk_logits(chunk, N_CTX // 2 - 1)[:-1].astype(np.float64)
            top = x.max(1, keepdims=True)
            out.append(x - top - np.log(np.exp(x - top).sum(1, keepdims=True)))
        scorer.close()
        return out

    ref = log_probs(TransformersScorer(src, n_ctx=N_CTX))
    got = log_probs(GPTQBackend().scorer(quant, n_ctx=N_CTX))

    def ppl(lps: list[np.ndarray]) -> float:
        nll = [-lp[np.arange(N_CTX // 2), c[N_CTX // 2:]] for lp, c in zip(lps, chunks, strict=True)]
        return float(np.exp(np.mean(np.concatenate(nll))))

    kl = np.concatenate([(np.exp(a) * (a - b)).sum(1) for a, b in zip(ref, got, strict=True)])
    top1 = np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(ref, got, strict=True)])
    p0, p1 = ppl(ref), ppl(got)
    return {"eval_tokens_scored": len(chunks) * N_CTX // 2, "ppl_bf16": p0, "ppl_gptq": p1,
            "delta_ppl_pct": 100 * (p1 / p0 - 1), "mean_kld": float(kl.mean()), "top1": float(top1.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64, help="calibration rows (quantkit's default)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per row (quantkit's default)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each, alternating")
    ap.add_argument("--no-reference", action="store_true", help="skip timing GPTQModel alone")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    WORK.mkdir(parents=True, exist_ok=True)
    src = fixture()
    ours: list[float] = []
    refs: list[float] = []
    ours_mb: list[float] = []
    refs_mb: list[float] = []
    out = Path()
    info: dict[str, Any] = {}
    for _ in range(args.repeat):
        with child_peak() as peak:
            seconds, out, info = run_ours(src, args.group_size, args.samples, args.seq_len)
        ours.append(seconds)
        ours_mb.append(peak["mb"])
        if not args.no_reference:
            with child_peak() as peak:
                refs.append(run_reference(src, args.group_size, args.samples, args.seq_len))
            refs_mb.append(peak["mb"])
    report: dict[str, Any] = {
        "model": "tests' tiny-llama3 (2 layers, hidden 256, ffn 768, vocab 2048)",
        "quant": f"4bit-g{args.group_size}", "calibration": f"builtin:ru-mix {args.samples} x {args.seq_len}",
        "wall_s": round(statistics.median(ours), 2), "wall_s_runs": [round(s, 2) for s in ours],
        "peak_rss_mb_gptqmodel_process": round(max(ours_mb), 1),
        "peak_rss_mb_quantkit_process": round(self_peak_mb(), 1),
        **info,
    }
    if refs:
        report["gptqmodel_alone_s"] = round(statistics.median(refs), 2)
        report["gptqmodel_alone_peak_rss_mb"] = round(max(refs_mb), 1)
        report["ratio_ours_to_gptqmodel_median"] = round(statistics.median(o / r for o, r in zip(ours, refs,
                                                                                                  strict=True)), 3)
    report.update({k: round(v, 6) if isinstance(v, float) else v for k, v in quality(src, out).items()})
    report["peak_rss_mb_eval"] = round(self_peak_mb(), 1)  # bf16 + GPTQ scorers, one after the other
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key:34} {value}")


if __name__ == "__main__":
    main()
