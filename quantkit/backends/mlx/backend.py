"""MLX through mlx-lm's own converter: one ``mlx_lm.convert -q`` per bit width, output byte for byte what mlx-lm
writes for the same (fixed) source, for mlx-lm and LM Studio on Apple silicon. Runs on any CPU (``mlx[cpu]``).

Layout in the workspace::

    mlx/<bits>bit/             one model folder per bit width (``4bit``, ``8bit``): model.safetensors (+ index),
                               config.json with ``quantization``, tokenizer files, chat template, generation config
    mlx/logs/<bits>bit.log     mlx_lm.convert's output

mlx_lm.convert runs in a child process (``python -m quantkit.backends.mlx JOB.json``) on a source folder of links
to the checkpoint with a config.json mlx-lm reads right (`quantkit.backends.mlx.config`); the child first refuses a
group size that some matrix's width does not allow (mlx-lm would leave it unquantized, silently). The README
mlx-lm writes is dropped: quantkit writes the card. mlx-lm is imported in quantkit's process only to score.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from quantkit import console
from quantkit.arch import Architecture
from quantkit.backends.base import JobContext, arch_support, tool_version, tool_versions
from quantkit.backends.mlx.card import MLXSections
from quantkit.backends.mlx.config import fix_config, prepare_source
from quantkit.backends.mlx.options import (
    CONFIG_FIX_VERSION,
    INSTALL_HINT,
    MLXOptions,
    approx_size,
    bits_name,
    check_widths,
    estimate_size,
)
from quantkit.backends.mlx.scorer import MLXScorer, is_mlx_folder
from quantkit.child import run_logged, why_failed
from quantkit.errors import QuantkitError
from quantkit.interrupts import child_env
from quantkit.steps import RESOLVE, Step, StepResult, StepRun, step_key
from quantkit.workspace import check_disk, fingerprint, write_json_atomic

TOOLS = ("mlx", "mlx-lm", "transformers")


class MLXBackend(MLXSections):
    """MLX models for mlx-lm and LM Studio (Apple silicon), made by mlx_lm.convert; no calibration."""

    name = "mlx"
    description = "MLX 2-8 bit through mlx-lm (mlx-lm, LM Studio on Apple silicon)"
    command_help = ("Quantize to MLX (mlx-lm's affine 2-8 bit) for mlx-lm and LM Studio on Apple silicon, one model "
                    "per --bits value; runs on any CPU.")
    options_model = MLXOptions

    def check(self) -> str | None:
        """None when mlx and mlx-lm are installed (found, not imported: importing mlx-lm takes seconds)."""
        if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
            return f"MLX needs mlx and mlx-lm: {INSTALL_HINT}"
        return None

    def supports(self, arch: type[Architecture]) -> str | None:
        """None when mlx-lm runs this architecture (said before any download)."""
        return arch_support(arch, "mlx", "mlx-lm")

    @staticmethod
    def _options(options: BaseModel) -> MLXOptions:
        if isinstance(options, MLXOptions):
            return options
        return MLXOptions.model_validate(options if isinstance(options, dict) else options.model_dump())

    def steps(self, ctx: JobContext, options: BaseModel) -> list[Step]:
        """One ``mlx_lm.convert`` per bit width, from the resolved checkpoint."""
        opts = self._options(options)
        ckpt = ctx.checkpoint
        if ckpt is not None:  # before any work: a layout mlx-lm cannot run, a group size a width does not allow
            fix_config(ckpt.config)
            check_widths(ckpt, opts.group_size)
        out = []
        for bits in opts.bits:
            name = bits_name(bits)
            size = estimate_size(ckpt, bits, opts.group_size) if ckpt is not None else \
                approx_size(ctx.n_params, bits, opts.group_size)
            fp = fingerprint("mlx", CONFIG_FIX_VERSION, ckpt.fingerprint, bits, opts.group_size,
                             tool_version("mlx"), tool_version("mlx-lm")) if ckpt is not None else ""
            out.append(Step(step_key("mlx", "quantize", name), "quantize",
                            f"MLX {bits}-bit, group size {opts.group_size} (mlx_lm.convert)",
                            inputs=(RESOLVE,), outputs=(f"mlx/{name}/",), fingerprint=fp, estimated_size=size,
                            artifact=name, extra=(("bits", bits), ("group_size", opts.group_size)),
                            action=lambda run, bits=bits: self._convert(run, bits, opts.group_size)))
        return out

    def _convert(self, run: StepRun, bits: int, group_size: int) -> StepResult:
        """mlx_lm.convert in a child process into the staging folder; its README goes."""
        ctx = run.ctx
        ckpt, ws = ctx.checkpoint, ctx.workspace
        name = bits_name(bits)
        out = run.path(f"mlx/{name}")
        check_disk(out.parent, estimate_size(ckpt, bits, group_size), f"MLX {name}")
        work = out.parent / f".{name}.work"
        for stale in (out, work):
            shutil.rmtree(stale, ignore_errors=True)
        (work / "tmp").mkdir(parents=True)
        logs = ws.root / "mlx" / "logs"  # made here: a Ray worker's workspace is read-only for records, not logs
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        start = time.monotonic()
        try:
            fixes = prepare_source(ckpt, work / "source")
            job = {"source": str(work / "source"), "output": str(out), "bits": bits, "group_size": group_size,
                   "result": str(work / "result.json")}
            write_json_atomic(work / "job.json", job)
            console.info(f"mlx {name}: mlx_lm.convert of {ckpt.name}, group size {group_size} (log: {log})")
            env = child_env()
            # the source is a local folder (nothing is fetched), and transformers writes the offline setting into
            # the saved tokenizer_config.json (``local_files_only``): the output is made as mlx-lm makes it online
            env.update(TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="0")
            rc = run_logged([sys.executable, "-m", "quantkit.backends.mlx", str(work / "job.json")], cwd=work,
                            env=env, log_path=log)
            result = json.loads((work / "result.json").read_text(encoding="utf-8")) \
                if (work / "result.json").exists() else {}
            if rc != 0 or "error" in result:
                why = result.get("error") or why_failed(rc, log)
                raise QuantkitError(f"MLX {name} of {ckpt.name} failed: {why}", f"full log: {log}")
            (out / "README.md").unlink(missing_ok=True)  # mlx-lm's template; quantkit writes the card
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = round(time.monotonic() - start, 1)
        total, params = result.get("total_size"), result.get("total_parameters")
        bpw = round(8 * total / params, 4) if total and params else None
        console.info(f"mlx {name}: done in {seconds:.0f} s ({bpw} bits per weight)")
        art = run.artifact(name, out, bpw=bpw, bits=bits, group_size=group_size, mode="affine",
                           config_fixes=fixes, tools=tool_versions(*TOOLS))
        return StepResult(info={"seconds": seconds, "log": ws.rel(log), "config_fixes": fixes,
                                "quantized_modules": result.get("quantized_modules")}, artifacts=art)

    def owns(self, path: Path) -> bool:
        return is_mlx_folder(Path(path))

    def scorer(self, path: Path, *, n_ctx: int) -> MLXScorer:
        if not self.owns(path):
            raise QuantkitError(f"{path} is not an MLX folder", "pass a folder written by `quantkit mlx`")
        reason = self.check()
        if reason is not None:
            raise QuantkitError(reason)
        return MLXScorer(Path(path), n_ctx=n_ctx)
