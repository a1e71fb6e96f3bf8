"""exllamav2's converter as a subprocess: its arguments, its ``[STATUS]`` progress lines, its log and its errors."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from quantkit import console
from quantkit.backends.exl2.options import Settings
from quantkit.errors import QuantkitError
from quantkit.interrupts import die_with_parent

CONVERTER_MODULE = "exllamav2.conversion.convert_exl2"
_STATUS = re.compile(r"\[STATUS\](.*?)\[/STATUS\]")
_CAL_PPL = re.compile(r"calibration perplexity \(quant\):\s*([0-9.]+)")
_NOISE = ("Output directory is not empty",)


def parse_status(line: str) -> dict[str, Any] | None:
    """The ``{"stage", "completion"}`` of a converter ``[STATUS]{json}[/STATUS]`` line, or None."""
    match = _STATUS.search(line)
    if not match:
        return None
    try:
        status = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    return status if isinstance(status, dict) else None


def converter_args(
    *, source: Path, work: Path, parquet: Path, st: Settings, head_bits: int, measurement_out: Path | None = None,
    measurement: Path | None = None, output: Path | None = None, bits: float | None = None, shard_size: int = 8192,
) -> list[str]:
    """Arguments of ``python -m exllamav2.conversion.convert_exl2`` for the measurement pass (`measurement_out`)
    or one conversion (`output`, `bits`, reusing `measurement`)."""
    args = ["-i", str(source), "-o", str(work), "-c", str(parquet), "-hb", str(head_bits),
            "-r", str(st.rows), "-l", str(st.length), "-mr", str(st.measure_rows), "-ml", str(st.measure_length),
            "-so"]
    if measurement_out is not None:
        return [*args, "-om", str(measurement_out)]
    if output is None or bits is None or measurement is None:
        raise ValueError("a conversion needs output, bits and measurement")
    return [*args, "-m", str(measurement), "-cf", str(output), "-b", f"{bits:g}", "-ss", str(shard_size)]


def run_converter(args: list[str], *, label: str, log: Path) -> list[str]:
    """Run exllamav2's converter, showing its ``[STATUS]`` lines as progress; its output goes to `log`.

    Returns the output lines. The converter exits 0 on many of its errors, so callers check ``job_new.json``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", CONVERTER_MODULE, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines: collections.deque[str] = collections.deque(maxlen=400)
    console.info(f"{label}: running exllamav2's converter (log: {log})")
    with console.progress() as bar, open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        task = bar.add_task(label, total=100)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                                errors="replace", bufsize=1, env=env, cwd=log.parent,
                                preexec_fn=die_with_parent)  # exllamav2's converter is not ours to change
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                status = parse_status(line)
                if status is not None:
                    completion = float(status.get("completion", 0.0))
                    bar.update(task, description=f"{label}: {status.get('stage', '')}", completed=100 * completion)
                    continue
                text = line.rstrip()
                lines.append(text)
                if text.lstrip().startswith("!!") and not any(n in text for n in _NOISE):
                    console.warn(f"exllamav2: {text.strip().lstrip('!').strip()}")
            proc.wait()
        except BaseException as exc:
            # Ctrl-C reached the converter too: give it time to save its job file, so a rerun resumes
            _stop(proc, grace=60 if isinstance(exc, KeyboardInterrupt) else 0)
            raise
    if proc.returncode:
        lines.append(f"(exit status {proc.returncode})")
    return list(lines)


def _stop(proc: subprocess.Popen[str], grace: float) -> None:
    try:
        proc.wait(timeout=grace or 0.1)
        return
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def calibration_perplexity(log: Path) -> float | None:
    """The converter's last "calibration perplexity (quant)" in a log, a sanity check of the conversion."""
    try:
        found = _CAL_PPL.findall(log.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return float(found[-1]) if found else None


def converter_failed(what: str, lines: list[str], log: Path) -> QuantkitError:
    """A one-line error from the converter's output: its own error line, else the last line."""
    errors = [ln.strip() for ln in lines if ln.strip().startswith(("##", "**")) or "Error" in ln]
    last = errors[-1] if errors else next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
    last = last.lstrip("#* ").strip()[:200]
    return QuantkitError(f"exllamav2's {what} did not finish: {last}",
                         f"full output in {log}; rerun the same command to resume")
