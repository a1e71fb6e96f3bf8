"""EXL2 through exllamav2's converter: a Russian calibration parquet, one measurement pass, one conversion per bitrate.

Layout in the workspace::

    exl2/calibration.parquet     our calibration texts (chat-formatted for instruct models), one ``text`` column
    exl2/measurement.json        the measurement pass, computed once and reused (``-m``) by every bitrate
    exl2/source/                 what the converter reads: links to the weights and tokenizer, a fixed config.json
    exl2/<bits>bpw/              one finished model folder per bitrate (``4.0bpw``, ``6.5bpw``)
    exl2/work/<step>/            the converter's working folder (``job_new.json``); a rerun resumes it
    exl2/.<bits>bpw.partial/     the model folder while it is written; renamed when complete
    exl2/logs/<step>.log         the converter's full output

exllamav2 0.3.2 compiles its CUDA extension when imported, so it is never imported here at module level: the
converter runs as a subprocess (``python -m exllamav2.conversion.convert_exl2``) and the scorer imports it lazily.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantkit import __version__, console
from quantkit.arch import Architecture
from quantkit.backends.base import JobContext, arch_support, calibration_summary, tool_version
from quantkit.backends.exl2.calib import (
    CalibrationFile,
    count_tokens,
    load_tokenizer,
    read_parquet_texts,
    texts_fingerprint,
)
from quantkit.backends.exl2.card import EXL2Sections
from quantkit.backends.exl2.config import fix_config_file, prepare_source
from quantkit.backends.exl2.converter import (
    calibration_perplexity,
    converter_args,
    converter_failed,
    run_converter,
)
from quantkit.backends.exl2.options import (
    CONFIG_FIX_VERSION,
    INSTALL_HINT,
    NO_CUDA,
    EXL2Options,
    Settings,
    bits_name,
    estimate_size,
    settings,
)
from quantkit.backends.exl2.scorer import EXL2Scorer
from quantkit.backends.exl2.work import clear_work, output_complete, quant_method, read_job, reset_work, work_state
from quantkit.calibration import CalibrationData, export_parquet, load
from quantkit.errors import MissingDependency, QuantkitError
from quantkit.source import Checkpoint
from quantkit.steps import RESOLVE, Resources, Step, StepResult, StepRun
from quantkit.workspace import check_disk, fingerprint, temp_name


def _cuda_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return f"EXL2 needs torch and exllamav2: {INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        return NO_CUDA
    return None


# -- the backend -----------------------------------------------------------------------------------------

class EXL2Backend(EXL2Sections):
    """EXL2 models for exllamav2 / TabbyAPI, calibrated on Russian text; needs CUDA."""

    name = "exl2"
    description = "EXL2 (exllamav2, CUDA)"
    command_help = ("Quantize to EXL2 (exllamav2) at one or more bitrates, calibrated on Russian text; needs an "
                    "NVIDIA GPU.")
    options_model = EXL2Options
    resources = {"*": {"gpus": 1.0}}  # every step needs CUDA (a cluster executor schedules it on a GPU)

    # -- protocol ----------------------------------------------------------------------------------------
    def check(self) -> str | None:
        """None when an NVIDIA GPU and exllamav2 are here. exllamav2 is found, not imported: importing it
        compiles its CUDA kernels (minutes on a first run)."""
        reason = _cuda_reason()
        if reason is not None:
            return reason
        if importlib.util.find_spec("exllamav2") is None:
            return f"exllamav2 is not installed: {INSTALL_HINT}"
        return None

    def supports(self, arch: type[Architecture]) -> str | None:
        """None when exllamav2 0.3.2 loads this architecture; else why not (said before any download)."""
        return arch_support(arch, "exl2", "exllamav2 0.3.2")

    def steps(self, ctx: JobContext, options: BaseModel) -> list[Step]:
        """The calibration parquet, one measurement reused by every bitrate, one conversion per bitrate; the
        parquet's token count is checked against what the passes need (a ``problem`` on its step)."""
        opts = self._options(options)
        ckpt = ctx.checkpoint
        st = settings(ctx, opts)
        calib_text = f"calibration parquet from {calibration_summary(ctx)} (needs {st.tokens_needed:,} tokens"
        cal: CalibrationFile | None = None
        problem = None
        if ckpt is not None:
            if not (ckpt.path / "tokenizer.json").exists():
                raise QuantkitError(f"{ckpt.name} has no tokenizer.json, which exllamav2 0.3.2 needs",
                                    "SentencePiece-only tokenizers are not supported by exllamav2; convert it first")
            try:
                cal = self._calibration(ctx, load_tokenizer(ckpt), None)
            except MissingDependency:
                calib_text += "; install transformers to count them)"
            else:
                calib_text += f", has {cal.tokens:,})"
                if cal.tokens < st.tokens_needed:
                    problem = str(self._too_few(cal, st))  # the format's run stops with it
                    calib_text += " — too few"
        else:
            calib_text += ")"
        fp_cal = self.calibration_fingerprint(ctx) if ckpt is not None else ""
        fp_meas = self.measurement_fingerprint(ctx, opts) if ckpt is not None else ""
        gpu = Resources(gpus=1.0)
        out = [
            Step("exl2/calibrate", "calibrate", calib_text, inputs=(RESOLVE,), outputs=("exl2/calibration.parquet",),
                 fingerprint=fp_cal, estimated_size=self._parquet_size(cal), action=self._build_parquet,
                 extra=(("problem", problem), ("tokens_needed", st.tokens_needed),
                        ("tokens_present", cal.tokens if cal else None))),
            Step("exl2/measure", "measure", f"measurement ({st.measure_rows} × {st.measure_length} tokens), reused "
                 "by every bitrate", inputs=("exl2/calibrate",), outputs=("exl2/measurement.json",),
                 fingerprint=fp_meas, estimated_size=self._measurement_size(ckpt), resources=gpu,
                 action=lambda run: self._measure(run, opts)),
        ]
        for bits in opts.bits:
            name = bits_name(bits)
            size = estimate_size(ckpt, bits, opts.head_bits) if ckpt is not None else (
                int(ctx.n_params * (bits + 0.1) / 8) if ctx.n_params else None)
            out.append(Step(f"exl2/quantize/{name}", "quantize",
                            f"quantize {name[:-3]} bpw (head {opts.head_bits} bits, {st.rows} × {st.length} tokens)",
                            inputs=("exl2/calibrate", "exl2/measure"), outputs=(f"exl2/{name}/",),
                            fingerprint=self.bits_fingerprint(ctx, opts, bits) if ckpt is not None else "",
                            estimated_size=size, resources=gpu, artifact=name, extra=(("bits", bits),),
                            action=lambda run, bits=bits: self._convert(run, opts, bits)))
        return out

    def owns(self, path: Path) -> bool:
        """An EXL2 model folder (``quant_method: exl2``), or a raw converter output with a measurement."""
        path = Path(path)
        if not path.is_dir():
            return False
        if quant_method(path) == "exl2":
            return True
        return any(path.glob("output*.safetensors")) and (path / "measurement.json").exists()

    def scorer(self, path: Path, *, n_ctx: int) -> EXL2Scorer:
        reason = self.check()
        if reason is not None:
            raise QuantkitError(reason)
        return EXL2Scorer(Path(path), n_ctx=n_ctx)

    # -- steps -------------------------------------------------------------------------------------------
    @staticmethod
    def _options(options: BaseModel) -> EXL2Options:
        if isinstance(options, EXL2Options):
            return options
        return EXL2Options.model_validate(options if isinstance(options, dict) else options.model_dump())

    def _calibration(self, ctx: JobContext, tokenizer: Any, path: Path | None,
                     data: CalibrationData | None = None) -> CalibrationFile:
        """Render the calibration set into a parquet at `path` (a temporary one when None) and count its tokens."""
        data = data or load(ctx.calibration)
        chat = ctx.checkpoint.instruct
        final = ctx.workspace.root / "exl2" / "calibration.parquet" if ctx.workspace is not None else None
        if path is None:
            with tempfile.TemporaryDirectory(prefix="quantkit-exl2-") as tmp:
                texts = read_parquet_texts(export_parquet(data, tokenizer, Path(tmp) / "c.parquet", chat=chat,
                                                          seed=ctx.seed))
            path = final or Path("exl2/calibration.parquet")
        else:
            texts = read_parquet_texts(export_parquet(data, tokenizer, path, chat=chat, seed=ctx.seed))
        return CalibrationFile(path=path, fingerprint=texts_fingerprint(texts), tokens=count_tokens(texts, tokenizer),
                               documents=len(texts), chat=chat and bool(getattr(tokenizer, "chat_template", None)),
                               spec=str(data.spec), content_hash=data.content_hash,
                               cyrillic_share=data.cyrillic_share(), text_bytes=sum(len(t.encode()) for t in texts))

    def _build_parquet(self, run: StepRun) -> StepResult:
        """The calibration parquet, built once per checkpoint × calibration set × seed."""
        ctx = run.ctx
        cal = self._calibration(ctx, load_tokenizer(ctx.checkpoint), run.path("exl2/calibration.parquet"))
        if cal.cyrillic_share < 0.5:
            console.warn(f"calibration set {cal.spec} is only {cal.cyrillic_share:.0%} Cyrillic; "
                         "quantkit is tuned for Russian text")
        console.info(f"calibration: exl2/calibration.parquet ({cal.documents} texts, {cal.tokens:,} tokens)")
        return StepResult(info={"texts_fingerprint": cal.fingerprint, "tokens": cal.tokens,
                                "documents": cal.documents, "chat": cal.chat, "spec": cal.spec,
                                "calibration_hash": cal.content_hash, "text_bytes": cal.text_bytes,
                                "cyrillic_share": round(cal.cyrillic_share, 4)})

    @staticmethod
    def calibration_fingerprint(ctx: JobContext) -> str:
        """What the parquet depends on: checkpoint (tokenizer, chat template), calibration text, chat, seed."""
        from quantkit.calibration import spec_hash

        return fingerprint("exl2-calibration", ctx.checkpoint.fingerprint, spec_hash(ctx.calibration),
                           ctx.checkpoint.instruct, ctx.seed)

    def measurement_fingerprint(self, ctx: JobContext, options: EXL2Options) -> str:
        """What the measurement depends on: the parquet, measurement rows and length."""
        st = settings(ctx, options)
        return fingerprint("exl2-measurement", self.calibration_fingerprint(ctx), st.measure_rows,
                           st.measure_length, CONFIG_FIX_VERSION)

    def bits_fingerprint(self, ctx: JobContext, options: EXL2Options, bits: float) -> str:
        """What one bitrate depends on: the measurement, the parquet, and its own options."""
        st = settings(ctx, options)
        return fingerprint("exl2-quant", self.measurement_fingerprint(ctx, options), bits, options.head_bits,
                           st.rows, st.length, options.shard_size, CONFIG_FIX_VERSION)

    @staticmethod
    def _too_few(cal: CalibrationFile, st: Settings) -> QuantkitError:
        per_pass = f"{st.rows} rows × {st.length} tokens"
        if st.measure_rows * st.measure_length > st.rows * st.length:
            per_pass = f"{st.measure_rows} measurement rows × {st.measure_length} tokens"
        fit = max(1, cal.tokens // max(st.length, st.measure_length))
        return QuantkitError(
            f"calibration set {cal.spec} has {cal.tokens:,} tokens for this tokenizer, but EXL2 needs "
            f"{st.tokens_needed:,} ({per_pass})",
            f"lower --rows to {fit} or --length, or give more text with --calibration",
        )

    @staticmethod
    def _parquet_size(cal: CalibrationFile | None) -> int | None:
        if cal is None:
            return None
        return cal.path.stat().st_size if cal.path.exists() else cal.text_bytes // 2  # parquet compresses text

    @staticmethod
    def _measurement_size(ckpt: Checkpoint | None) -> int | None:
        if ckpt is None:
            return None
        layers = int(ckpt.config.get("num_hidden_layers") or 1)
        return 40_000 * layers  # measurement.json: a few dozen KB of error tables per layer

    @staticmethod
    def _require_gpu() -> None:
        reason = EXL2Backend().check()
        if reason is not None:
            raise QuantkitError(reason)

    def _measure(self, run: StepRun, opts: EXL2Options) -> StepResult:
        """exllamav2's measurement pass (``-om``); an unfinished pass of the same inputs is resumed."""
        self._require_gpu()
        ctx = run.ctx
        ws = ctx.workspace
        st = settings(ctx, opts)
        parquet = run.input("exl2/calibrate").path
        source = ws.root / "exl2" / "source"
        prepare_source(ctx.checkpoint, source)
        work = ws.root / "exl2" / "work" / "measurement"
        done_file = work / "measurement.json"
        log = ws.root / "exl2" / "logs" / "measurement.log"
        state = work_state(work, run.step.fingerprint, done_file.exists())
        if state == "new":
            reset_work(work, run.step.fingerprint, log)
        elif state == "resume":
            console.info(f"measurement: resuming the unfinished pass in {ws.rel(work)}")
        if state != "finished":
            hidden = int(ctx.checkpoint.config.get("hidden_size") or 4096)
            check_disk(work, st.measure_rows * st.measure_length * hidden * 8, "the EXL2 measurement pass")
            args = converter_args(source=source, work=work, parquet=parquet, st=st, head_bits=opts.head_bits,
                                  measurement_out=done_file)
            lines = run_converter(args, label="measurement", log=log)
            job = read_job(work)
            if not (job and job.get("progress") == "finished" and done_file.exists()):
                raise converter_failed("measurement", lines, log)
        os.replace(done_file, run.path("exl2/measurement.json"))
        clear_work(work)
        return StepResult(info={"parquet": "exl2/calibration.parquet", "measure_rows": st.measure_rows,
                                "measure_length": st.measure_length, "exllamav2": tool_version("exllamav2")})

    def _convert(self, run: StepRun, opts: EXL2Options, bits: float) -> StepResult:
        """One bitrate from the measurement; its converter's working folder stays in the workspace, so a conversion
        that stopped half way is resumed by the next run."""
        self._require_gpu()
        ctx = run.ctx
        ws = ctx.workspace
        st = settings(ctx, opts)
        root = ws.root / "exl2"
        name = bits_name(bits)
        out = run.path(f"exl2/{name}")
        partial = temp_name(root / name)  # the converter's output folder: stable, so a stopped conversion resumes
        work = root / "work" / name
        log = root / "logs" / f"{name}.log"
        source = root / "source"
        prepare_source(ctx.checkpoint, source)
        parquet = run.input("exl2/calibrate").path
        measurement = run.input("exl2/measure").path
        state = work_state(work, run.step.fingerprint, output_complete(partial))
        if state == "new":
            reset_work(work, run.step.fingerprint, partial, log)
        elif state == "resume":
            console.info(f"{name}: resuming the unfinished conversion in {ws.rel(work)}")
        if state != "finished":
            size = estimate_size(ctx.checkpoint, bits, opts.head_bits)
            check_disk(root, 2 * size + st.rows * st.length * int(ctx.checkpoint.config.get("hidden_size") or 4096)
                       * 8, f"the EXL2 {bits:g} bpw conversion")
            args = converter_args(source=source, work=work, parquet=parquet, st=st, head_bits=opts.head_bits,
                                  measurement=measurement, output=partial, bits=bits, shard_size=opts.shard_size)
            lines = run_converter(args, label=name, log=log)
            job = read_job(work)
            if not (job and job.get("progress") == "finished" and output_complete(partial)):
                raise converter_failed(f"{bits:g} bpw conversion", lines, log)
        fix_config_file(partial / "config.json")
        os.replace(partial, out)
        cal_ppl = calibration_perplexity(log)
        clear_work(work)
        cal = run.input("exl2/calibrate").info
        calibration = {"spec": cal.get("spec"), "fingerprint": cal.get("calibration_hash"),
                       "parquet": "exl2/calibration.parquet", "parquet_fingerprint": cal.get("texts_fingerprint"),
                       "tokens": cal.get("tokens"), "chat_template": cal.get("chat"), "rows": st.rows,
                       "length": st.length, "measure_rows": st.measure_rows, "measure_length": st.measure_length}
        tools = {"quantkit": __version__, "exllamav2": tool_version("exllamav2"), "torch": tool_version("torch")}
        art = run.artifact(name, out, bpw=bits, head_bits=opts.head_bits, calibration=calibration,
                           measurement="exl2/measurement.json", calibration_perplexity=cal_ppl, tools=tools)
        console.info(f"{name}: exl2/{name}")
        return StepResult(artifacts=art, info={"bits": bits, "head_bits": opts.head_bits,
                                               "calibration_perplexity": cal_ppl,
                                               "exllamav2": tool_version("exllamav2")})
