"""Shared helpers for the GGUF benchmarks: checkpoints, the llama.cpp reference tools, timed child processes.

Every measured command runs in a fresh child process; its wall time comes from the parent's clock and its peak
resident memory from GNU ``/usr/bin/time -v`` (its "Maximum resident set size"). Not from ``os.wait4`` or
``getrusage(RUSAGE_CHILDREN)`` on a child started from here: Linux carries the high-water RSS of the memory image
a process had before ``exec`` into its ``ru_maxrss``, and a child forked from here starts with this process's
image, so every child would report at least this benchmark process's own peak. ``time`` is a small C process, so the
floor it adds is a couple of MiB. The machine is shared and noisy: runs alternate between the two sides and the
scripts quote medians of per-round ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
PYTHON = sys.executable
SITE = Path(sysconfig.get_paths()["purelib"])
SDIST_VERSION = "0.3.36"

# The timed model: Llama-3 layout, every width a multiple of 256 so that K-quants apply to every matrix. Training
# is brief (about a minute a step here); note that train_steps=10 crashes build_checkpoint (OneCycleLR's warm-up
# phase then has zero length: ZeroDivisionError), so avoid exactly 10.
BENCH_SPEC: dict[str, Any] = dict(family="llama3", vocab_size=16384, hidden=1024, layers=8, heads=16, kv_heads=4,
                                  ffn=2816, train_steps=8)
# Small checkpoints for the converter identity check (the tests' fixture sizes; instruct ones carry a template).
SMALL_SPEC: dict[str, Any] = dict(vocab_size=2048, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768, train_steps=0)
# One small checkpoint per registered architecture (and the tokenizer variants llama.cpp names differently), for the
# converter identity check; the Llama-3 one is the timed benchmark model. Instruct ones carry a chat template.
SMALL_FAMILIES: dict[str, dict[str, Any]] = {
    "llama31": dict(family="llama31", instruct=True),
    "qwen2": dict(family="qwen2", instruct=True),
    "qwen3": dict(family="qwen3", instruct=True),
    "mistral": dict(family="mistral", instruct=True),
    "nemo": dict(family="nemo", instruct=True),
    "yandexgpt": dict(family="yandexgpt", instruct=True, vocab_size=32000),
    "gemma3": dict(family="gemma3", instruct=True, layers=6),
    "gemma3mm": dict(family="gemma3mm", instruct=True, layers=6),
    "gigachat3": dict(family="gigachat3", instruct=True, layers=4, kv_heads=4),
    "gigachat3-noq": dict(family="gigachat3-noq", instruct=True, layers=26, kv_heads=4),
    "smollm": dict(family="smollm"),
    "gpt2": dict(family="gpt2"),
}


# -- checkpoints -----------------------------------------------------------------------------------------------

def ensure_checkpoint(name: str, spec: dict[str, Any]) -> Path:
    """Build `spec` with ``quantkit.demo.build_checkpoint`` under _work/ckpt/`name` once (in a child process, so
    that training does not weigh on the caller); rebuilt when the spec changes."""
    out = WORK / "ckpt" / name
    stamp = out / "benchmark-spec.json"
    want = json.dumps(spec, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want and (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"building checkpoint {name} ({want}) …", flush=True)
    t0 = time.perf_counter()
    code = ("import json, sys; from pathlib import Path; from quantkit.demo import build_checkpoint; "
            "spec = json.loads(sys.argv[2]); build_checkpoint(Path(sys.argv[1]), spec.pop('family'), **spec)")
    subprocess.run([PYTHON, "-c", code, str(out), want], check=True, cwd=ROOT)
    stamp.write_text(want)
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def bench_checkpoint() -> Path:
    return ensure_checkpoint("bench-llama3", BENCH_SPEC)


def small_checkpoint(family: str) -> Path:
    return ensure_checkpoint(f"small-{family}", {**SMALL_SPEC, **SMALL_FAMILIES[family]})


def load_checkpoint(path: Path) -> Any:
    from quantkit.source import load_local

    return load_local(path, name=path.name, source=str(path))


def _derived(name: str, script: str, what: str) -> Path:
    """`WORK/gguf/<name>` made from the benchmark model by `script`, rebuilt when the model's spec changes."""
    ckpt = bench_checkpoint()
    out = WORK / "gguf" / name
    stamp = out.with_suffix(".spec")
    want = (ckpt / "benchmark-spec.json").read_text()
    if out.exists() and stamp.exists() and stamp.read_text() == want:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{what} …", flush=True)
    run_python(script, str(ckpt), str(out), check=True)
    stamp.write_text(want)
    return out


def bench_bf16_gguf() -> Path:
    """The benchmark model converted to BF16 by quantkit (cached)."""
    return _derived("bench-llama3-BF16.gguf", QUANTKIT_CONVERT, "converting the benchmark model to BF16")


def bench_imatrix() -> Path:
    """An importance matrix of the benchmark model from quantkit's built-in Russian calibration text (cached)."""
    return _derived("bench-llama3-imatrix.gguf", QUANTKIT_IMATRIX,
                    "computing the benchmark model's importance matrix (16 × 512 tokens of builtin:ru-mix)")


def bench_q4km_gguf() -> Path:
    """Q4_K_M of the benchmark model with its importance matrix, quantized by quantkit (cached)."""
    src, imatrix = bench_bf16_gguf(), bench_imatrix()
    out = WORK / "gguf" / "bench-llama3-Q4_K_M.gguf"
    stamp = out.with_suffix(".spec")
    want = (bench_checkpoint() / "benchmark-spec.json").read_text()
    if out.exists() and stamp.exists() and stamp.read_text() == want:
        return out
    print("quantizing the benchmark model to Q4_K_M …", flush=True)
    run_python(QUANTKIT_QUANTIZE, str(src), str(out), "Q4_K_M", str(imatrix), check=True)
    stamp.write_text(want)
    return out


# Child-process programs (argv after -c). Each prints one JSON line with what it measured itself.
QUANTKIT_CONVERT = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from quantkit.backends.gguf.convert.converter import Converter
from quantkit.source import load_local
src, out = Path(sys.argv[1]), Path(sys.argv[2])
t1 = time.perf_counter()
Converter(load_local(src, name=src.name, source=str(src)), "bf16").write(out)
print(json.dumps({"import_s": t1 - t0, "work_s": time.perf_counter() - t1}))
"""

QUANTKIT_IMATRIX = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from quantkit.backends.gguf.quantize.imatrix import compute_imatrix, write_imatrix
from quantkit.calibration import token_rows
from quantkit.source import load_local
src, out = Path(sys.argv[1]), Path(sys.argv[2])
ckpt = load_local(src, name=src.name, source=str(src))
tok = AutoTokenizer.from_pretrained(src)
rows = token_rows("builtin:ru-mix", tok, n_samples=16, seq_len=512, seed=0, chat=False)
sums, counts = compute_imatrix(ckpt, rows, bos=tok.bos_token_id)
write_imatrix(out, sums, counts, datasets=["builtin:ru-mix"], chunk_size=512)
"""

QUANTKIT_QUANTIZE = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from quantkit.backends.gguf.quantize.imatrix import read_imatrix
from quantkit.backends.gguf.quantize.core import QuantizeOptions, quantize
src, dst, ftype, imatrix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
t1 = time.perf_counter()
data = read_imatrix(Path(imatrix)) if imatrix != "-" else None
quantize(src, dst, QuantizeOptions(ftype, imatrix=data))
print(json.dumps({"import_s": t1 - t0, "work_s": time.perf_counter() - t1}))
"""


# -- llama.cpp ---------------------------------------------------------------------------------------------------

def tool(name: str) -> Path:
    """A llama.cpp tool installed with llama-cpp-python (scripts/install.sh builds them)."""
    path = SITE / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run scripts/install.sh (it builds llama.cpp's tools)")
    return path


def tool_env() -> dict[str, str]:
    libs = f"{SITE / 'lib'}:{SITE / 'llama_cpp' / 'lib'}"
    old = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": f"{libs}:{old}" if old else libs}


def tool_help(name: str) -> str:
    proc = subprocess.run([str(tool(name)), "--help"], capture_output=True, text=True, env=tool_env(), timeout=60)
    return proc.stdout + proc.stderr


def llama_cpp_dir() -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (for ``convert_hf_to_gguf.py``): /tmp/sdist if it is
    there, otherwise downloaded with pip into _work/sdist and extracted."""
    inner = Path(f"llama_cpp_python-{SDIST_VERSION}") / "vendor" / "llama.cpp"
    for base in (Path("/tmp/sdist"), WORK / "sdist"):
        if (base / inner / "convert_hf_to_gguf.py").exists():
            return base / inner
    dest = WORK / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    print(f"fetching the llama-cpp-python {SDIST_VERSION} sdist for llama.cpp's convert_hf_to_gguf.py …", flush=True)
    subprocess.run([PYTHON, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={SDIST_VERSION}", "-d", str(dest)], check=True)
    archive = dest / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / inner


# -- timed child processes ---------------------------------------------------------------------------------------

@dataclass
class Run:
    wall_s: float
    peak_rss: int  # bytes
    rc: int
    stdout: str
    stderr: str
    extra: dict[str, Any] = field(default_factory=dict)  # the child's last JSON line, if any
    tree_rss: int = 0  # bytes: the largest sum of RSS over the command's whole process tree (sampled every 20 ms)


def _tree_rss(root: int) -> int:
    """RSS summed over `root` and its descendants, from /proc (0 where /proc cannot tell)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
            with open(f"/proc/{pid}/status") as fh:
                total += next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError):
            continue
    return total


class _TreeSampler(threading.Thread):
    """Samples `_tree_rss` of a running command: GNU time's figure is its largest single process, which
    understates a command that runs a helper process beside itself."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _tree_rss(self.pid))


def measure(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            check: bool = True) -> Run:
    """Run `cmd` in a fresh process under ``/usr/bin/time -v``: wall time from here, peak RSS from ``time``."""
    gnu_time = Path("/usr/bin/time")
    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".time") as rep:
        full = [str(gnu_time), "-v", "-o", rep.name, *map(str, cmd)] if gnu_time.exists() else list(map(str, cmd))
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, env=env, cwd=cwd or ROOT)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        report = rep.read()
    peak = int(usage.ru_maxrss) * 1024  # fallback only: includes this process's own high-water mark
    for line in report.splitlines():
        if "Maximum resident set size" in line:
            peak = int(line.rsplit(":", 1)[1]) * 1024
    run = Run(wall, peak, proc.returncode, stdout, stderr, tree_rss=max(sampler.peak, peak))
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                run.extra = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    if check and run.rc != 0:
        raise SystemExit(f"command failed (rc {run.rc}): {' '.join(map(str, cmd))[:300]}\n{stderr[-3000:]}")
    return run


def run_python(code: str, *args: str, check: bool = True) -> Run:
    return measure([PYTHON, "-c", code, *args], check=check)


def alternate(sides: dict[str, Callable[[int], Run]], repeat: int) -> dict[str, list[Run]]:
    """`repeat` rounds; each round runs every side once, the order reversed every other round."""
    names = list(sides)
    out: dict[str, list[Run]] = {n: [] for n in names}
    for i in range(repeat):
        for name in names if i % 2 == 0 else names[::-1]:
            run = sides[name](i)
            out[name].append(run)
            print(f"  round {i + 1}/{repeat} {name:<24} {run.wall_s:7.2f} s  {mib(run.peak_rss):7.0f} MiB",
                  flush=True)
    return out


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def mib(n: float) -> float:
    return n / (1 << 20)


def table(rows: list[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- GGUF comparison -----------------------------------------------------------------------------------------------

def read_gguf(path: Path, skip: tuple[str, ...] = ("GGUF.",)) -> tuple[dict[str, Any], dict[str, tuple], list[str]]:
    """(metadata minus keys starting with `skip`, {tensor: (type, shape, sha256 of the bytes)}, tensor order)."""
    import hashlib

    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith(skip)}
    tensors: dict[str, tuple] = {}
    order = []
    for t in reader.tensors:
        digest = hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()
        tensors[t.name] = (t.tensor_type.name, tuple(int(x) for x in t.shape), digest)
        order.append(t.name)
    return meta, tensors, order


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


def _value_diff(a: Path, b: Path, name: str) -> str:
    """How far apart two float tensors of the same name are."""
    import gguf
    import numpy as np

    x = next(t for t in gguf.GGUFReader(a).tensors if t.name == name)
    y = next(t for t in gguf.GGUFReader(b).tensors if t.name == name)
    if x.tensor_type != gguf.GGMLQuantizationType.F32 or y.tensor_type != gguf.GGMLQuantizationType.F32:
        return ""
    u, v = np.asarray(x.data, np.float64).ravel(), np.asarray(y.data, np.float64).ravel()
    rel = np.abs(u - v) / np.maximum(np.abs(v), 1e-30)
    return f" ({int((u != v).sum())} of {u.size} values differ, max relative difference {rel.max():.1e})"


def compare_gguf(ours: Path, ref: Path, skip: tuple[str, ...] = ("GGUF.",)) -> dict[str, Any]:
    """Tensor-by-tensor (name, type, shape, bytes) and key-by-key comparison of two GGUF files."""
    m1, t1, o1 = read_gguf(ours, skip)
    m2, t2, o2 = read_gguf(ref, skip)
    tensor_diffs = []
    for name in sorted(set(t1) | set(t2)):
        a, b = t1.get(name), t2.get(name)
        if a is None or b is None:
            tensor_diffs.append(f"{name}: only in {'reference' if a is None else 'quantkit'}")
            continue
        for what, x, y in zip(("type", "shape", "bytes"), a, b, strict=True):
            if x != y:
                extra = _value_diff(ours, ref, name) if what == "bytes" else ""
                tensor_diffs.append(f"{name}: {what} differ" + (f" ({x} vs {y})" if what != "bytes" else extra))
    meta_diffs = []
    for key in sorted(set(m1) | set(m2)):
        if key not in m1:
            meta_diffs.append(f"{key}: only in reference ({_short(m2[key])})")
        elif key not in m2:
            meta_diffs.append(f"{key}: only in quantkit ({_short(m1[key])})")
        elif m1[key] != m2[key]:
            meta_diffs.append(f"{key}: quantkit {_short(m1[key])} vs reference {_short(m2[key])}")
    return {"tensors": len(t2), "tensor_diffs": tensor_diffs, "meta_keys": len(m2), "meta_diffs": meta_diffs,
            "same_order": o1 == o2}


def file_sha256(path: Path) -> str:
    from quantkit.workspace import file_sha256 as sha256

    return sha256(path)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_summary(results: list[tuple[str, bool]]) -> None:
    """The closing PASS/FAIL line per target that every benchmark prints."""
    print("\n== summary ==")
    for name, ok in results:
        print(f"{verdict(ok)}  {name}")


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cores} cores, load average {load:.1f} at start"


def clean(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


if __name__ == "__main__":  # build (or reuse) every benchmark checkpoint and the cached GGUF inputs
    for fam in SMALL_FAMILIES:
        small_checkpoint(fam)
    bench_q4km_gguf()
    print(f"checkpoints and GGUF inputs are ready under {WORK}")
