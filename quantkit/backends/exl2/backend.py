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
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantkit import __version__, console
from quantkit.arch import Architecture
from quantkit.backends.base import Artifact, JobContext, tool_version
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
from quantkit.workspace import check_disk, fingerprint, temp_name


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


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
        if arch.exl2:
            return None
        return arch.exl2_note or f"exllamav2 0.3.2 does not support {'/'.join(arch.hf_names)}"

    def plan(self, ctx: JobContext, options: BaseModel) -> list[dict[str, Any]]:
        """The steps of `run` with outputs, sizes, calibration tokens needed vs present, and what is done."""
        opts = self._options(options)
        ws, ckpt = ctx.workspace, ctx.checkpoint
        st = settings(ctx, opts)
        steps: list[dict[str, Any]] = []

        calib_text = f"calibration parquet (needs {st.tokens_needed:,} tokens"
        cal: CalibrationFile | None = None
        problem = None
        try:
            tokenizer = load_tokenizer(ckpt)
            cal = self._calibration(ctx, tokenizer, None)
        except MissingDependency:
            calib_text += "; install transformers to count them)"
        else:
            calib_text += f", has {cal.tokens:,})"
            if cal.tokens < st.tokens_needed:
                problem = self._too_few(cal, st).message
                calib_text += " — too few"
        if not (ckpt.path / "tokenizer.json").exists():
            problem = "exllamav2 0.3.2 needs a tokenizer.json (SentencePiece-only tokenizers are not supported)"
            calib_text += " — no tokenizer.json"
        parquet_done = cal is not None and ws.is_done("exl2/calibration", self.calibration_fingerprint(
            ctx, cal.content_hash))
        steps.append({"step": calib_text, "output": "exl2/calibration.parquet",
                      "estimated_size": self._parquet_size(cal), "done": parquet_done,
                      "tokens_needed": st.tokens_needed, "tokens_present": cal.tokens if cal else None,
                      "problem": problem})

        meas_fp = self.measurement_fingerprint(ctx, opts, cal.fingerprint) if cal else None
        bit_fps = {b: self.bits_fingerprint(ctx, opts, cal.fingerprint, b) if cal else None for b in opts.bits}
        bits_done = {b: fp is not None and ws.is_done(f"exl2/{bits_name(b)}", fp) for b, fp in bit_fps.items()}
        meas_done = meas_fp is not None and (ws.is_done("exl2/measurement", meas_fp) or all(bits_done.values()))
        steps.append({"step": f"measurement ({st.measure_rows} × {st.measure_length} tokens), reused by every bitrate",
                      "output": "exl2/measurement.json", "estimated_size": self._measurement_size(ckpt),
                      "done": meas_done})
        for bits in opts.bits:
            name = bits_name(bits)
            what = f"quantize {name[:-3]} bpw (head {opts.head_bits} bits, {st.rows} × {st.length} tokens)"
            steps.append({"step": what,
                          "output": f"exl2/{name}/", "estimated_size": estimate_size(ckpt, bits, opts.head_bits),
                          "done": bits_done[bits], "bits": bits})
        return steps

    def run(self, ctx: JobContext, options: BaseModel) -> list[Artifact]:
        """Parquet → measurement (once) → one conversion per bitrate; finished steps are skipped."""
        opts = self._options(options)
        ws, ckpt = ctx.workspace, ctx.checkpoint
        st = settings(ctx, opts)
        root = ws.dir("exl2")
        if not (ckpt.path / "tokenizer.json").exists():
            raise QuantkitError(f"{ckpt.name} has no tokenizer.json, which exllamav2 0.3.2 needs",
                                "SentencePiece-only tokenizers are not supported by exllamav2; convert it first")
        tokenizer = load_tokenizer(ckpt)
        cal = self.prepare_calibration(ctx, tokenizer)
        if cal.tokens < st.tokens_needed:
            raise self._too_few(cal, st)
        if cal.cyrillic_share < 0.5:
            console.warn(f"calibration set {cal.spec} is only {cal.cyrillic_share:.0%} Cyrillic; "
                         "quantkit is tuned for Russian text")

        measurement = root / "measurement.json"
        meas_fp = self.measurement_fingerprint(ctx, opts, cal.fingerprint)
        pending = [b for b in opts.bits
                   if not ws.is_done(f"exl2/{bits_name(b)}", self.bits_fingerprint(ctx, opts, cal.fingerprint, b))]
        source = root / "source"
        if pending:  # GPU work ahead (finished bitrates need neither the GPU nor the measurement)
            self._require_gpu()
            prepare_source(ckpt, source)
            if ws.is_done("exl2/measurement", meas_fp):
                console.info(f"measurement: reusing {ws.rel(measurement)}")
            else:
                self._measure(ctx, opts, st, cal, source, measurement, meas_fp)

        artifacts = []
        for bits in opts.bits:
            fp = self.bits_fingerprint(ctx, opts, cal.fingerprint, bits)
            name = bits_name(bits)
            final = root / name
            if ws.is_done(f"exl2/{name}", fp):
                console.info(f"{name}: already done ({ws.rel(final)})")
            else:
                self._convert(ctx, opts, st, cal, source, measurement, bits, fp)
            artifacts.append(self._artifact(ctx, opts, st, cal, bits, fp))
        return artifacts

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
        if path is None:
            with tempfile.TemporaryDirectory(prefix="quantkit-exl2-") as tmp:
                texts = read_parquet_texts(export_parquet(data, tokenizer, Path(tmp) / "c.parquet", chat=chat,
                                                          seed=ctx.seed))
            path = ctx.workspace.root / "exl2" / "calibration.parquet"
        else:
            texts = read_parquet_texts(export_parquet(data, tokenizer, path, chat=chat, seed=ctx.seed))
        return CalibrationFile(path=path, fingerprint=texts_fingerprint(texts), tokens=count_tokens(texts, tokenizer),
                               documents=len(texts), chat=chat and bool(getattr(tokenizer, "chat_template", None)),
                               spec=str(data.spec), content_hash=data.content_hash,
                               cyrillic_share=data.cyrillic_share(), text_bytes=sum(len(t.encode()) for t in texts))

    def prepare_calibration(self, ctx: JobContext, tokenizer: Any) -> CalibrationFile:
        """The calibration parquet in the workspace, built once per checkpoint × calibration set × seed."""
        ws = ctx.workspace
        path = ws.dir("exl2") / "calibration.parquet"
        data = load(ctx.calibration)
        step_fp = self.calibration_fingerprint(ctx, data.content_hash)
        info = ws.step_info("exl2/calibration")
        if ws.is_done("exl2/calibration", step_fp) and info.get("texts_fingerprint") and info.get("tokens"):
            return CalibrationFile(path=path, fingerprint=info["texts_fingerprint"], tokens=int(info["tokens"]),
                                   documents=int(info.get("documents", 0)), chat=bool(info.get("chat")),
                                   spec=str(data.spec), content_hash=data.content_hash,
                                   cyrillic_share=data.cyrillic_share(), text_bytes=int(info.get("text_bytes", 0)))
        cal = self._calibration(ctx, tokenizer, path, data)
        ws.record_step("exl2/calibration", step_fp, [path], texts_fingerprint=cal.fingerprint, tokens=cal.tokens,
                       documents=cal.documents, chat=cal.chat, spec=cal.spec, calibration_hash=cal.content_hash,
                       text_bytes=cal.text_bytes)
        console.info(f"calibration: {ws.rel(path)} ({cal.documents} texts, {cal.tokens:,} tokens)")
        return cal

    @staticmethod
    def calibration_fingerprint(ctx: JobContext, content_hash: str) -> str:
        """What the parquet depends on: checkpoint (tokenizer, chat template), calibration text, chat, seed."""
        return fingerprint("exl2-calibration", ctx.checkpoint.fingerprint, content_hash, ctx.checkpoint.instruct,
                           ctx.seed)

    @staticmethod
    def measurement_fingerprint(ctx: JobContext, options: EXL2Options, parquet_fp: str) -> str:
        """What the measurement depends on: checkpoint, parquet texts, measurement rows and length."""
        st = settings(ctx, options)
        return fingerprint("exl2-measurement", ctx.checkpoint.fingerprint, parquet_fp, st.measure_rows,
                           st.measure_length, CONFIG_FIX_VERSION)

    def bits_fingerprint(self, ctx: JobContext, options: EXL2Options, parquet_fp: str, bits: float) -> str:
        """What one bitrate depends on: the measurement, the parquet texts, and its own options."""
        st = settings(ctx, options)
        return fingerprint("exl2-quant", ctx.checkpoint.fingerprint, parquet_fp,
                           self.measurement_fingerprint(ctx, options, parquet_fp), bits, options.head_bits,
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
    def _measurement_size(ckpt: Checkpoint) -> int:
        layers = int(ckpt.config.get("num_hidden_layers") or 1)
        return 40_000 * layers  # measurement.json: a few dozen KB of error tables per layer

    @staticmethod
    def _require_gpu() -> None:
        reason = EXL2Backend().check()
        if reason is not None:
            raise QuantkitError(reason)

    def _measure(self, ctx: JobContext, opts: EXL2Options, st: Settings, cal: CalibrationFile, source: Path,
                 measurement: Path, fp: str) -> None:
        ws = ctx.workspace
        work = ws.root / "exl2" / "work" / "measurement"
        done_file = work / "measurement.json"
        log = ws.root / "exl2" / "logs" / "measurement.log"
        state = work_state(work, fp, done_file.exists())
        if state == "new":
            reset_work(work, fp, log)
        elif state == "resume":
            console.info(f"measurement: resuming the unfinished pass in {ws.rel(work)}")
        if state != "finished":
            hidden = int(ctx.checkpoint.config.get("hidden_size") or 4096)
            check_disk(work, st.measure_rows * st.measure_length * hidden * 8, "the EXL2 measurement pass")
            args = converter_args(source=source, work=work, parquet=cal.path, st=st, head_bits=opts.head_bits,
                                  measurement_out=done_file)
            lines = run_converter(args, label="measurement", log=log)
            job = read_job(work)
            if not (job and job.get("progress") == "finished" and done_file.exists()):
                raise converter_failed("measurement", lines, log)
        os.replace(done_file, measurement)
        clear_work(work)
        ws.record_step("exl2/measurement", fp, [measurement], parquet=ws.rel(cal.path),
                       measure_rows=st.measure_rows, measure_length=st.measure_length,
                       exllamav2=tool_version("exllamav2"))

    def _convert(self, ctx: JobContext, opts: EXL2Options, st: Settings, cal: CalibrationFile, source: Path,
                 measurement: Path, bits: float, fp: str) -> None:
        ws = ctx.workspace
        root = ws.root / "exl2"
        name = bits_name(bits)
        final = root / name
        partial = temp_name(final)
        work = root / "work" / name
        log = root / "logs" / f"{name}.log"
        state = work_state(work, fp, output_complete(partial))
        if state == "new":
            reset_work(work, fp, partial, log)
        elif state == "resume":
            console.info(f"{name}: resuming the unfinished conversion in {ws.rel(work)}")
        if state != "finished":
            size = estimate_size(ctx.checkpoint, bits, opts.head_bits)
            check_disk(root, 2 * size + st.rows * st.length * int(ctx.checkpoint.config.get("hidden_size") or 4096) * 8,
                       f"the EXL2 {bits:g} bpw conversion")
            args = converter_args(source=source, work=work, parquet=cal.path, st=st, head_bits=opts.head_bits,
                                  measurement=measurement, output=partial, bits=bits, shard_size=opts.shard_size)
            lines = run_converter(args, label=name, log=log)
            job = read_job(work)
            if not (job and job.get("progress") == "finished" and output_complete(partial)):
                raise converter_failed(f"{bits:g} bpw conversion", lines, log)
        fix_config_file(partial / "config.json")
        cal_ppl = calibration_perplexity(log)
        if final.exists():  # an older conversion with other inputs: replace it
            old = root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(final)
        clear_work(work)
        ws.record_step(f"exl2/{name}", fp, [final], bits=bits, head_bits=opts.head_bits,
                       calibration_perplexity=cal_ppl, exllamav2=tool_version("exllamav2"))
        console.info(f"{name}: {ws.rel(final)}")

    def _artifact(self, ctx: JobContext, opts: EXL2Options, st: Settings, cal: CalibrationFile, bits: float,
                  fp: str) -> Artifact:
        ws = ctx.workspace
        name = bits_name(bits)
        final = ws.root / "exl2" / name
        files = _folder_files(final)
        step = ws.step_info(f"exl2/{name}")
        info = {
            "fingerprint": fp,
            "head_bits": opts.head_bits,
            "calibration": {
                "spec": cal.spec, "fingerprint": cal.content_hash, "parquet": ws.rel(cal.path),
                "parquet_fingerprint": cal.fingerprint, "tokens": cal.tokens, "chat_template": cal.chat,
                "rows": st.rows, "length": st.length, "measure_rows": st.measure_rows,
                "measure_length": st.measure_length,
            },
            "measurement": "exl2/measurement.json",
            "calibration_perplexity": step.get("calibration_perplexity"),
            "tools": {"quantkit": __version__, "exllamav2": step.get("exllamav2") or tool_version("exllamav2"),
                      "torch": tool_version("torch")},
            "command": ctx.command,
        }
        art = Artifact(format="exl2", quant=name, path=final, files=files, size=sum(p.stat().st_size for p in files),
                       bpw=bits, info=info)
        ws.record_artifact(final, **art.to_manifest(ws))
        return art

