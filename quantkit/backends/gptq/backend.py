"""GPTQ through GPTQModel: our Russian calibration rows in, a ``quant_method: gptq`` folder out.

The folder (``<ws>/gptq/<bits>bit-g<group>[-desc][-asym]``) holds ``qweight/qzeros/scales/g_idx`` tensors in the
GPTQ v1 layout that transformers (with optimum), vLLM and TGI load, the source's tokenizer and generation config,
a ``config.json`` with ``quantization_config`` and a ``quantize_config.json``; no machine paths and no calibration
text are written into it.

Quantization runs GPTQModel in a child process (``python -m quantkit.backends.gptq JOB.json``): GPTQModel prints
to stdout, patches transformers and safetensors at import, sets environment variables and writes ``logs/`` into
its working directory. The child runs in a work folder inside the workspace with ``TMPDIR`` pointing there, so
none of that reaches the user's stdout (``--json``), the current directory or ``/tmp``; its output goes to
``<ws>/gptq/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from quantkit import __version__, console
from quantkit.arch import Architecture
from quantkit.backends.base import Artifact, JobContext, tool_versions
from quantkit.backends.gptq.card import GPTQSections
from quantkit.backends.gptq.options import (
    COPIED_FILES,
    GPTQ_EXTRA_HINT,
    GPTQOptions,
    bits_per_weight,
    check_group_size,
    estimate_size,
    is_gptq_folder,
)
from quantkit.backends.gptq.scorer import TransformersScorer
from quantkit.errors import MissingDependency, QuantkitError
from quantkit.source import Checkpoint
from quantkit.workspace import Workspace, check_disk, fingerprint, temp_name, write_json_atomic

# Sanitized out of the published configs: machine-specific fields of GPTQModel's `meta`.
_MACHINE_KEYS = {"offload_to_disk_path"}
_MAX_CPU_WORKERS = 12  # GPTQModel's own cap on its CPU worker pool


def _plan_key(ctx: JobContext, opts: GPTQOptions) -> str:
    """What decides the output, as far as is known without tokenizing (for --dry-run)."""
    return fingerprint(ctx.checkpoint.fingerprint, str(ctx.calibration), ctx.calib_samples, ctx.calib_seq_len,
                       ctx.seed, ctx.checkpoint.instruct, opts.model_dump(), _compute_threads(ctx))


def _compute_threads(ctx: JobContext) -> dict[str, int]:
    """The torch threads of the quantizing child: GPTQ's float sums on the CPU, and so its output bytes, depend on
    them (measured: 1 vs 2 threads give different files), so they are part of what the output depends on."""
    from quantkit.threads import threads

    return {"threads": ctx.threads or threads()}


def _sanitize(obj: Any, roots: list[str]) -> Any:
    """A JSON value without machine-specific fields or absolute paths (values under `roots`, or any ``/...``)."""
    if isinstance(obj, dict):
        return {k: _sanitize(v, roots) for k, v in obj.items() if k not in _MACHINE_KEYS}
    if isinstance(obj, list):
        return [_sanitize(v, roots) for v in obj]
    if isinstance(obj, str) and (os.path.isabs(obj) or any(r and r in obj for r in roots)):
        return None
    return obj


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _last_error(log: Path) -> str:
    """The most telling line of a failed child's log: the last exception line, else the last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*", ln):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# -- the backend ----------------------------------------------------------------------------------------

class GPTQBackend(GPTQSections):
    """GPTQ (GPTQModel) with quantkit's calibration rows; output loads in transformers, vLLM and TGI."""

    name = "gptq"
    description = "GPTQ int2/3/4/8 through GPTQModel (transformers, vLLM, TGI)"
    options_model = GPTQOptions
    # GPTQModel uses a GPU where there is one (a cluster without GPUs runs it on CPUs, as on this machine)
    resources = {"*": {"gpus": 1.0}}

    def check(self) -> str | None:
        if importlib.util.find_spec("gptqmodel") is None:
            return f"GPTQ needs the gptq extra: {GPTQ_EXTRA_HINT}"
        return None

    def supports(self, arch: type[Architecture]) -> str | None:
        """None when GPTQModel quantizes this architecture; else why not (said before any download)."""
        if arch.gptq:
            return None
        return arch.gptq_note or f"GPTQModel does not support {'/'.join(arch.hf_names)}"

    @staticmethod
    def _options(options: BaseModel) -> GPTQOptions:
        return options if isinstance(options, GPTQOptions) else GPTQOptions.model_validate(options.model_dump())

    def _output(self, ws: Workspace, opts: GPTQOptions) -> Path:
        return ws.root / "gptq" / opts.quant

    def plan(self, ctx: JobContext, options: BaseModel) -> list[dict[str, Any]]:
        opts = self._options(options)
        check_group_size(ctx.checkpoint, opts.group_size)
        step = f"gptq:{opts.quant}"
        out = self._output(ctx.workspace, opts)
        rec = ctx.workspace.steps.get(step, {})
        done = (rec.get("info", {}).get("plan_key") == _plan_key(ctx, opts)
                and all(ctx.workspace.abs(r).exists() for r in rec.get("outputs", [])))
        return [{"step": step, "output": ctx.workspace.rel(out), "estimated_size": estimate_size(ctx.checkpoint, opts),
                 "done": done,
                 "bits": opts.bits, "group_size": opts.group_size, "desc_act": opts.desc_act, "sym": opts.sym,
                 "calibration": {"spec": str(ctx.calibration), "samples": ctx.calib_samples,
                                 "seq_len": ctx.calib_seq_len}}]

    def run(self, ctx: JobContext, options: BaseModel) -> list[Artifact]:
        opts = self._options(options)
        ckpt, ws = ctx.checkpoint, ctx.workspace
        check_group_size(ckpt, opts.group_size)  # before any work
        rows, tokenizer_info = self._calibration_rows(ctx)
        from quantkit.calibration import rows_fingerprint

        calib = {"spec": str(ctx.calibration), "samples": int(rows.shape[0]), "seq_len": int(rows.shape[1]),
                 "tokens": int(rows.size), "fingerprint": rows_fingerprint(rows), **tokenizer_info}
        step = f"gptq:{opts.quant}"
        fp = fingerprint(ckpt.fingerprint, calib["fingerprint"], opts.model_dump(), _compute_threads(ctx))
        out = self._output(ws, opts)
        if ws.is_done(step, fp):
            console.info(f"gptq {opts.quant}: done already ({ws.rel(out)}), skipping")
        else:
            info = self._quantize(ctx, opts, rows, out)
            ws.record_step(step, fp, [out], plan_key=_plan_key(ctx, opts), calibration=calib, **info)
        artifact = self._artifact(ws, out, opts, ctx, calib, fp)
        ws.record_artifact(out, **artifact.to_manifest(ws))
        return [artifact]

    # -- run's parts ------------------------------------------------------------------------------------

    @staticmethod
    def _calibration_rows(ctx: JobContext) -> tuple[np.ndarray, dict[str, Any]]:
        """The job's calibration rows: built once per workspace and shared with the other formats."""
        from quantkit.calibration_rows import calibration_rows

        cal = calibration_rows(ctx)
        return cal.rows, {"chat_template": cal.info["chat_template"]}

    def _quantize(self, ctx: JobContext, opts: GPTQOptions, rows: np.ndarray, out: Path) -> dict[str, Any]:
        """Run GPTQModel in a child process into a temporary folder, clean the folder up, rename it to `out`."""
        ckpt, ws = ctx.checkpoint, ctx.workspace
        src = Path(ckpt.path).resolve()
        source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        # the offload folder holds about one more copy of the weights while the output is written
        check_disk(out.parent, source_bytes + 2 * estimate_size(ckpt, opts), f"GPTQ {opts.quant}")
        tmp_out = temp_name(out)
        work = out.parent / f".{out.name}.work"
        logs = ws.dir("gptq", "logs")
        log_path = logs / f"{opts.quant}.log"
        for stale in (tmp_out, work):
            shutil.rmtree(stale, ignore_errors=True)
        (work / "tmp").mkdir(parents=True)
        rows_path = work / "rows.npy"
        np.save(rows_path, rows)
        job = {"source": str(src), "output": str(tmp_out), "rows": str(rows_path), "offload": str(work / "offload"),
               "threads": _compute_threads(ctx)["threads"], **opts.model_dump()}
        write_json_atomic(work / "job.json", job)
        env = dict(os.environ)
        workers = min(ctx.threads or _cpu_count(), _cpu_count(), _MAX_CPU_WORKERS)
        # at least 2: GPTQModel carves a 2-worker model-loader pool out of its CPU pool (1 fails: --threads 1)
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, workers)))
        env.update(TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        console.info(f"gptq {opts.quant}: quantizing {ckpt.name} with GPTQModel on {rows.shape[0]} × "
                     f"{rows.shape[1]} calibration tokens (log: {log_path})")
        start = time.monotonic()
        try:
            rc = self._run_child(work / "job.json", work, env, log_path)
            if rc != 0:
                why = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "") if rc < 0 else \
                    _last_error(log_path)
                raise QuantkitError(f"GPTQModel failed on {ckpt.name} ({opts.quant}): {why}", f"full log: {log_path}")
            if not (tmp_out / "config.json").exists():
                raise QuantkitError(f"GPTQModel wrote no model for {ckpt.name} ({opts.quant})", f"full log: {log_path}")
            self._finish_folder(tmp_out, src, ckpt, roots=[str(ws.root), str(work), str(src)])
            quant_log = tmp_out / "quant_log.csv"
            if quant_log.exists():
                shutil.move(quant_log, logs / f"{opts.quant}.quant_log.csv")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp_out, out)
        except BaseException:
            shutil.rmtree(tmp_out, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = round(time.monotonic() - start, 1)
        console.info(f"gptq {opts.quant}: done in {seconds:.0f} s → {ws.rel(out)}")
        return {"seconds": seconds, "log": ws.rel(log_path), **self._losses(logs / f"{opts.quant}.quant_log.csv")}

    @staticmethod
    def _run_child(job: Path, work: Path, env: dict[str, str], log_path: Path) -> int:
        """Run the worker; its output goes to the log, and to stderr unless quiet. Ctrl-C stops it."""
        cmd = [sys.executable, "-m", "quantkit.backends.gptq", str(job)]
        show = not console.is_quiet()
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if show:
                        sys.stderr.write(line)
                return proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise

    @staticmethod
    def _finish_folder(folder: Path, src: Path, ckpt: Checkpoint, roots: list[str]) -> None:
        """Source config + sanitized quantization_config; source tokenizer and generation config as they are."""
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        qcfg = _sanitize(saved.get("quantization_config") or {}, roots)
        if qcfg.get("quant_method") != "gptq":
            raise QuantkitError(f"GPTQModel wrote quant_method={qcfg.get('quant_method')!r}, expected 'gptq'",
                                "report this: the GPTQModel version may not be the tested one (7.6.0)")
        meta = qcfg.setdefault("meta", {})
        meta["quantizer"] = [*meta.get("quantizer", []), f"quantkit:{__version__}"]
        config = dict(ckpt.config)
        for key in ("dtype", "torch_dtype"):
            if key in saved:
                config[key] = saved[key]
        if "dtype" in saved and "torch_dtype" in config:
            config["torch_dtype"] = saved["dtype"]
        config["quantization_config"] = qcfg
        (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        qc_path = folder / "quantize_config.json"
        qc = _sanitize(json.loads(qc_path.read_text(encoding="utf-8")), roots) if qc_path.exists() else dict(qcfg)
        qc.setdefault("meta", {})["quantizer"] = meta["quantizer"]
        qc_path.write_text(json.dumps(qc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in (*COPIED_FILES, "special_tokens_map.json"):  # GPTQModel's rewrites go; the source's come
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        for name in COPIED_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, folder / name)
        from quantkit.backends.gptq_restore import restore

        restored = restore(ckpt, folder)
        if restored:
            console.info(f"gptq: put back {len(restored)} unquantized tensor(s) GPTQModel left out "
                         f"(e.g. {restored[0]})")

    @staticmethod
    def _losses(csv_path: Path) -> dict[str, Any]:
        if not csv_path.exists():
            return {}
        import csv

        losses: list[float] = []
        fallbacks = 0
        with open(csv_path, encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                # "0.0012", or "fallback(rtn): 0.0018" for a module GPTQModel rounded (too few calibration tokens
                # reached it: a rarely routed expert)
                found = re.search(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", row.get("loss") or "")
                if found:
                    losses.append(float(found.group()))
                    fallbacks += "fallback" in (row.get("loss") or "")
        if not losses:
            return {}
        return {"layers_quantized": len(losses), "max_loss": max(losses), "rtn_fallbacks": fallbacks}

    def _artifact(self, ws: Workspace, out: Path, opts: GPTQOptions, ctx: JobContext, calib: dict[str, Any],
                  fp: str) -> Artifact:
        files = sorted(p for p in out.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        calibration = {k: calib[k] for k in ("spec", "samples", "seq_len", "tokens", "fingerprint", "chat_template")
                       if k in calib}  # chat_template: the card says the dialogues used the model's template
        return Artifact(
            format="gptq", quant=opts.quant, path=out, files=files, size=size, bpw=bits_per_weight(out),
            info={"bits": opts.bits, "group_size": opts.group_size, "desc_act": opts.desc_act, "sym": opts.sym,
                  "damp_percent": opts.damp, "calibration": calibration,
                  "tools": tool_versions("gptqmodel", "transformers", "torch", "optimum"), "command": ctx.command,
                  "fingerprint": fp},
        )

    # -- reading artifacts back -------------------------------------------------------------------------

    def owns(self, path: Path) -> bool:
        return is_gptq_folder(path)

    def scorer(self, path: Path, *, n_ctx: int) -> TransformersScorer:
        if not self.owns(path):
            raise QuantkitError(f"{path} is not a GPTQ folder", "pass a folder written by `quantkit gptq`")
        if self.check() is not None:
            raise MissingDependency("scoring a GPTQ model needs gptqmodel", GPTQ_EXTRA_HINT)
        return TransformersScorer(Path(path), n_ctx=n_ctx, name=f"gptq:{Path(path).name}")

