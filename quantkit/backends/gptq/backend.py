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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from quantkit import __version__, console
from quantkit.arch import Architecture
from quantkit.backends.base import JobContext, arch_support, tool_versions
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
from quantkit.child import run_logged, why_failed
from quantkit.errors import MissingDependency, QuantkitError
from quantkit.interrupts import child_env
from quantkit.quality.scorers import TransformersScorer
from quantkit.source import Checkpoint
from quantkit.steps import CALIBRATE, Step, StepResult, StepRun, step_key
from quantkit.workspace import check_disk, fingerprint, write_json_atomic

# Sanitized out of the published configs: machine-specific fields of GPTQModel's `meta`.
_MACHINE_KEYS = {"offload_to_disk_path"}
_MAX_CPU_WORKERS = 12  # GPTQModel's own cap on its CPU worker pool


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


# -- the backend ----------------------------------------------------------------------------------------

class GPTQBackend(GPTQSections):
    """GPTQ (GPTQModel) with quantkit's calibration rows; output loads in transformers, vLLM and TGI."""

    name = "gptq"
    description = "GPTQ int2/3/4/8 through GPTQModel (transformers, vLLM, TGI)"
    command_help = ("Quantize a model to GPTQ (GPTQModel), calibrated on Russian text; loads in transformers, vLLM "
                    "and TGI.")
    options_model = GPTQOptions
    quant_method = "gptq"  # what GPTQModel writes into quantization_config (AWQ subclasses with "awq")
    version = 2  # bump when the bytes written for the same inputs change
    article, install_hint = "a", GPTQ_EXTRA_HINT  # for messages (AWQ: "an AWQ folder", its own hint)
    # GPTQModel uses a GPU where there is one (a cluster without GPUs runs it on CPUs, as on this machine)
    resources = {"*": {"gpus": 1.0}}

    def check(self) -> str | None:
        if importlib.util.find_spec("gptqmodel") is None:
            return f"GPTQ needs the gptq extra: {GPTQ_EXTRA_HINT}"
        return None

    def supports(self, arch: type[Architecture]) -> str | None:
        """None when GPTQModel quantizes this architecture; else why not (said before any download)."""
        return arch_support(arch, "gptq", "GPTQModel")

    @staticmethod
    def _options(options: BaseModel) -> GPTQOptions:
        return options if isinstance(options, GPTQOptions) else GPTQOptions.model_validate(options.model_dump())

    def steps(self, ctx: JobContext, options: BaseModel) -> list[Step]:
        """One step per variant: GPTQModel on the shared calibration rows (``model/calibrate``)."""
        from quantkit.calibration.rows import step_fingerprint

        opts = self._options(options)
        ckpt = ctx.checkpoint
        fp = ""
        if ckpt is not None:
            check_group_size(ckpt, opts.group_size)  # before any work
            fp = fingerprint(self.name, self.version, ckpt.fingerprint, step_fingerprint(ctx), opts.model_dump(),
                             _compute_threads(ctx))
        size = self.estimate_size(ckpt, opts) if ckpt is not None else _approx_size(ctx.n_params, opts)
        calib = {"spec": str(ctx.calibration), "samples": ctx.calib_samples, "seq_len": ctx.calib_seq_len}
        extra = {**self.artifact_fields(opts), "calibration": calib}
        title = self.format_info().title
        return [Step(step_key(self.name, "quantize", opts.quant), "quantize", f"{title} {opts.quant} (GPTQModel)",
                     inputs=(CALIBRATE,), outputs=(f"{self.name}/{opts.quant}/",), fingerprint=fp, estimated_size=size,
                     artifact=opts.quant, extra=tuple(sorted(extra.items())),
                     action=lambda run, opts=opts: self._run(run, opts))]

    @staticmethod
    def estimate_size(ckpt: Checkpoint, opts: Any) -> int:
        return estimate_size(ckpt, opts)

    def _run(self, run: StepRun, opts: Any) -> StepResult:
        from quantkit.calibration.rows import rows_of

        ctx = run.ctx
        cal = rows_of(run)
        calib = {k: cal.info[k] for k in ("spec", "samples", "seq_len", "tokens", "fingerprint", "chat_template")
                 if k in cal.info}  # chat_template: the card says the dialogues used the model's template
        out = run.path(f"{self.name}/{opts.quant}")
        info = self._quantize(ctx, opts, cal.rows, out)
        art = run.artifact(opts.quant, out, bpw=self.bits_per_weight(out), **self.artifact_fields(opts),
                           calibration=calib, tools=tool_versions("gptqmodel", "transformers", "torch", "optimum"))
        return StepResult(info={"calibration": calib, **info}, artifacts=art)

    @staticmethod
    def artifact_fields(opts: Any) -> dict[str, Any]:
        """What the manifest records about a variant's settings."""
        return {"bits": opts.bits, "group_size": opts.group_size, "desc_act": opts.desc_act, "sym": opts.sym,
                "damp_percent": opts.damp}

    @staticmethod
    def bits_per_weight(folder: Path) -> float | None:
        return bits_per_weight(folder)

    def worker_job(self, opts: Any) -> dict[str, Any]:
        """The settings the child's QuantizeConfig is made from."""
        return {"method": self.quant_method, **opts.model_dump()}

    def _quantize(self, ctx: JobContext, opts: Any, rows: np.ndarray, out: Path) -> dict[str, Any]:
        """Run GPTQModel in a child process into `out` (in the step's staging folder) and clean the folder up."""
        ckpt, ws = ctx.checkpoint, ctx.workspace
        src = Path(ckpt.path).resolve()
        source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        # the offload folder holds about one more copy of the weights while the output is written
        label = f"{self.format_info().title} {opts.quant}"
        check_disk(out.parent, source_bytes + 2 * self.estimate_size(ckpt, opts), label)
        work = out.parent / f".{out.name}.work"
        logs = ws.root / self.name / "logs"  # made here: a Ray worker's workspace is read-only for records, not logs
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{opts.quant}.log"
        for stale in (out, work):
            shutil.rmtree(stale, ignore_errors=True)
        (work / "tmp").mkdir(parents=True)
        rows_path = work / "rows.npy"
        np.save(rows_path, rows)
        job = {"source": str(src), "output": str(out), "rows": str(rows_path), "offload": str(work / "offload"),
               "threads": _compute_threads(ctx)["threads"], **self.worker_job(opts)}
        write_json_atomic(work / "job.json", job)
        env = child_env()
        workers = min(ctx.threads or _cpu_count(), _cpu_count(), _MAX_CPU_WORKERS)
        # at least 2: GPTQModel carves a 2-worker model-loader pool out of its CPU pool (1 fails: --threads 1)
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, workers)))
        env.update(TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        console.info(f"{self.name} {opts.quant}: quantizing {ckpt.name} with GPTQModel on {rows.shape[0]} × "
                     f"{rows.shape[1]} calibration tokens (log: {log_path})")
        start = time.monotonic()
        try:
            rc = run_logged([sys.executable, "-m", "quantkit.backends.gptq", str(work / "job.json")], cwd=work,
                            env=env, log_path=log_path)
            if rc != 0:
                why = why_failed(rc, log_path)
                raise QuantkitError(f"GPTQModel failed on {ckpt.name} ({label}): {why}", f"full log: {log_path}")
            if not (out / "config.json").exists():
                raise QuantkitError(f"GPTQModel wrote no model for {ckpt.name} ({label})", f"full log: {log_path}")
            self._finish_folder(out, src, ckpt, roots=[str(ws.root), str(work), str(src)])
            quant_log = out / "quant_log.csv"
            if quant_log.exists():
                shutil.move(quant_log, logs / f"{opts.quant}.quant_log.csv")
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = round(time.monotonic() - start, 1)
        console.info(f"{self.name} {opts.quant}: done in {seconds:.0f} s")
        return {"seconds": seconds, "log": ws.rel(log_path), **self._losses(logs / f"{opts.quant}.quant_log.csv")}

    def _finish_folder(self, folder: Path, src: Path, ckpt: Checkpoint, roots: list[str]) -> None:
        """Source config + sanitized quantization_config; source tokenizer and generation config as they are."""
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        qcfg = _sanitize(saved.get("quantization_config") or {}, roots)
        if qcfg.get("quant_method") != self.quant_method:
            raise QuantkitError(f"GPTQModel wrote quant_method={qcfg.get('quant_method')!r}, expected "
                                f"{self.quant_method!r}",
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
        from quantkit.backends.gptq.restore import restore

        restored = restore(ckpt, folder)
        if restored:
            console.info(f"{self.name}: put back {len(restored)} unquantized tensor(s) GPTQModel left out "
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

    # -- reading artifacts back -------------------------------------------------------------------------

    def owns(self, path: Path) -> bool:
        return is_gptq_folder(path)

    def scorer(self, path: Path, *, n_ctx: int) -> TransformersScorer:
        """Both GPTQ and AWQ folders load through GPTQModel's kernels in transformers."""
        what = f"{self.article} {self.format_info().title}"
        if not self.owns(path):
            raise QuantkitError(f"{path} is not {what} folder", f"pass a folder written by `quantkit {self.name}`")
        if self.check() is not None:
            raise MissingDependency(f"scoring {what} model needs gptqmodel", self.install_hint)
        from quantkit.backends.gptq.load import load_gptq

        return TransformersScorer(Path(path), n_ctx=n_ctx, name=f"{self.name}:{Path(path).name}", load=load_gptq)



def _approx_size(n_params: int | None, opts: GPTQOptions) -> int | None:
    """The saved size from the parameter count alone (a model not here yet)."""
    per_weight = opts.bits + (0 if opts.group_size == -1 else (16 + opts.bits) / opts.group_size)
    # decoder Linear layers are ~87% of a Llama-style model's parameters; the rest stays 16-bit
    return int(n_params * (0.87 * per_weight + 0.13 * 16) / 8) if n_params else None
