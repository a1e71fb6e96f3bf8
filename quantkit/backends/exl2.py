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

import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantkit import __version__, console
from quantkit.arch import Architecture
from quantkit.backends.base import Artifact, JobContext
from quantkit.calibration import CalibrationData, export_parquet, load
from quantkit.errors import MissingDependency, QuantkitError
from quantkit.source import TOKENIZER_FILES, Checkpoint
from quantkit.workspace import check_disk, fingerprint, temp_name, write_json_atomic

CONVERTER_MODULE = "exllamav2.conversion.convert_exl2"
INSTALL_HINT = "pip install 'quantkit-ru[exl2]'"
NO_CUDA = "EXL2 needs an NVIDIA GPU with CUDA (exllamav2 is CUDA-only); none found"
CONFIG_FIX_VERSION = 1  # bump when fix_config changes what the converter sees
HEAD_BITS = (2, 3, 4, 5, 6, 8)  # exllamav2's qparams_headoptions
# Average bits of the head layer per -hb option (mix of bit widths plus 4-bit scales per group), for size estimates.
HEAD_BPW = {2: 2.73, 3: 3.28, 4: 4.43, 5: 5.18, 6: 6.33, 8: 8.03}
SOURCE_EXTRA_FILES = ("generation_config.json",)
_STATUS = re.compile(r"\[STATUS\](.*?)\[/STATUS\]")
_CAL_PPL = re.compile(r"calibration perplexity \(quant\):\s*([0-9.]+)")
_NOISE = ("Output directory is not empty",)


class EXL2Options(BaseModel):
    """Options of `quantkit exl2` (and of an ``exl2`` entry in a recipe)."""

    model_config = ConfigDict(extra="forbid")

    bits: list[float] = Field(default_factory=lambda: [4.0, 5.0, 6.5],
                              description="target bits per weight of the decoder layers, one model per value")
    head_bits: int = Field(6, description="bits of the output head: 2, 3, 4, 5, 6 or 8")
    rows: int | None = Field(None, ge=1, description="calibration rows for quantizing (default: --calib-samples)")
    length: int | None = Field(None, ge=16, description="tokens per calibration row (default: --calib-seq-len)")
    measure_rows: int | None = Field(None, ge=1, description="rows for the measurement pass (default: rows)")
    measure_length: int | None = Field(None, ge=16, description="tokens per measurement row (default: length)")
    shard_size: int = Field(8192, ge=0, description="largest output shard in MB (0: one file)")

    @field_validator("bits", mode="before")
    @classmethod
    def _parse_bits(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return [float(p) for p in parts]
            except ValueError as exc:
                raise ValueError(f"bits must be numbers like 4.0,5.0,6.5, not '{value}'") from exc
        if isinstance(value, int | float):
            return [float(value)]
        return value

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one bitrate, e.g. 4.0")
        for b in value:
            if not 2.0 <= b <= 8.0:
                raise ValueError(f"{b:g} bits per weight is outside what exllamav2 can reach (2.0 to 8.0)")
        return sorted({round(float(b), 3) for b in value})

    @field_validator("head_bits")
    @classmethod
    def _check_head_bits(cls, value: int) -> int:
        if value not in HEAD_BITS:
            raise ValueError(f"head bits must be one of {', '.join(map(str, HEAD_BITS))}, not {value}")
        return value


@dataclass(frozen=True)
class Settings:
    """The options with defaults filled in from the job (calibration rows and length)."""

    rows: int
    length: int
    measure_rows: int
    measure_length: int

    @property
    def tokens_needed(self) -> int:
        """The converter cuts rows × length tokens from the concatenated parquet, for each pass."""
        return max(self.rows * self.length, self.measure_rows * self.measure_length)


@dataclass
class CalibrationFile:
    """The calibration parquet and what the converter will find in it."""

    path: Path
    fingerprint: str  # hash of the texts in it, in order
    tokens: int  # tokens for the model's tokenizer, texts concatenated as the converter does
    documents: int
    chat: bool
    spec: str
    content_hash: str
    cyrillic_share: float
    text_bytes: int = 0


def settings(ctx: JobContext, options: EXL2Options) -> Settings:
    rows = options.rows or ctx.calib_samples
    length = options.length or ctx.calib_seq_len
    return Settings(rows, length, options.measure_rows or rows, options.measure_length or length)


def bits_name(bits: float) -> str:
    """The folder (and quant) name of a bitrate: 4.0 → ``4.0bpw``, 4.125 → ``4.125bpw``."""
    text = f"{bits:.3f}".rstrip("0")
    return f"{text}0bpw" if text.endswith(".") else f"{text}bpw"


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


# -- the config fix --------------------------------------------------------------------------------------

def fix_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Hugging Face config that exllamav2 reads correctly.

    transformers 5 saves RoPE settings under ``rope_parameters``; exllamav2 reads top-level ``rope_theta`` and
    ``rope_scaling`` and silently falls back to a base of 10000. Both are copied to the top level (``rope_scaling``
    only for a non-default RoPE type). exllamav2 also ignores ``use_sliding_window: false``, so the window is
    dropped then.
    """
    fixed = dict(config)
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if fixed.get("rope_theta") is None and params.get("rope_theta") is not None:
            fixed["rope_theta"] = params["rope_theta"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in (None, "default") and not fixed.get("rope_scaling"):
            fixed["rope_scaling"] = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
        if fixed.get("partial_rotary_factor") is None and params.get("partial_rotary_factor") is not None:
            fixed["partial_rotary_factor"] = params["partial_rotary_factor"]
        if (rope_type in ("longrope", "su") and "original_max_position_embeddings" in params
                and "original_max_position_embeddings" not in fixed):
            fixed["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    if fixed.get("use_sliding_window") is False and fixed.get("sliding_window"):
        fixed["sliding_window"] = None
    return fixed


def fix_config_file(path: Path) -> None:
    """Apply `fix_config` to a config.json in place (atomically)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    fixed = fix_config(config)
    if fixed != config:
        write_json_atomic(path, fixed)


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src.resolve())
    except OSError:  # no symlinks (Windows without developer mode): a hard link, else a copy
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def prepare_source(ckpt: Checkpoint, dest: Path) -> Path:
    """`dest` as the converter's input: links to the weights and tokenizer files and a fixed config.json.

    No safetensors index and no README: the converter copies every non-weight file into its output.
    """
    tmp = temp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in sorted(ckpt.path.glob("*.safetensors")):
        _link(file, tmp / file.name)
    for name in (*TOKENIZER_FILES, *SOURCE_EXTRA_FILES):
        if (ckpt.path / name).exists():
            _link(ckpt.path / name, tmp / name)
    config = json.loads((ckpt.path / "config.json").read_text(encoding="utf-8"))
    (tmp / "config.json").write_text(json.dumps(fix_config(config), indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


# -- converter working folders ---------------------------------------------------------------------------

def read_job(work: Path) -> dict[str, Any] | None:
    """The converter's ``job_new.json`` in `work`, or None when there is none (or it is unreadable)."""
    try:
        job = json.loads((work / "job_new.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return job if isinstance(job, dict) else None


def _stamp(work: Path) -> Path:
    return work.with_name(work.name + ".quantkit.json")


def work_state(work: Path, fp: str, output_complete: bool) -> str:
    """What to do with a converter working folder: ``new``, ``resume`` or ``finished``.

    ``resume``: an unfinished job of the same inputs (the converter resumes when given the same ``-o``).
    ``finished``: the job finished and its output is complete, only the final rename is left.
    ``new``: anything else; a stale or broken folder must be cleared first (`reset_work`).
    """
    try:
        stamp = json.loads(_stamp(work).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "new"
    job = read_job(work)
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != fp or job is None or "invalid" in job:
        return "new"
    if job.get("progress") == "finished":
        return "finished" if output_complete else "new"
    return "resume"


def reset_work(work: Path, fp: str, *extra: Path) -> None:
    """Clear a working folder (and `extra`: partial outputs, old logs) and stamp it with its inputs' fingerprint."""
    for path in (work, *extra):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    work.mkdir(parents=True)
    write_json_atomic(_stamp(work), {"fingerprint": fp})


def clear_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _stamp(work).unlink()


def output_complete(folder: Path) -> bool:
    """A converter output folder with weights and a config.json marked ``quant_method: exl2``."""
    if not folder.is_dir() or not any(folder.glob("output*.safetensors")):
        return False
    if any(folder.glob("output_temp_*.safetensors")):
        return False
    return quant_method(folder) == "exl2"


def quant_method(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    return qcfg.get("quant_method") if isinstance(qcfg, dict) else None


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


# -- helpers ---------------------------------------------------------------------------------------------

def _tool_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load_tokenizer(ckpt: Checkpoint) -> Any:
    """The checkpoint's tokenizer through transformers (chat template included)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise MissingDependency("EXL2 calibration needs transformers to read the tokenizer", INSTALL_HINT) from exc
    return AutoTokenizer.from_pretrained(str(ckpt.path))


def count_tokens(texts: list[str], tokenizer: Any) -> int:
    """Tokens of the texts encoded one by one without special tokens and concatenated, as the converter does."""
    if not texts:
        return 0
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def texts_fingerprint(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()[:16]


def read_parquet_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if isinstance(t, str)]


def estimate_size(ckpt: Checkpoint, bits: float, head_bits: int) -> int:
    """About the bytes of an EXL2 model: linear weights at `bits`, the head at `head_bits`, the rest in fp16."""
    total = 0.0
    head_bpw = HEAD_BPW.get(head_bits, head_bits + 0.3)
    has_head = any(name.endswith("lm_head.weight") for name in ckpt.tensors.tensors)
    for name, info in ckpt.tensors.tensors.items():
        n = int(np.prod(info.shape, dtype=np.int64))
        if name.endswith("embed_tokens.weight"):
            total += n * 2
            if not has_head:  # tied embeddings: exllamav2 still writes a quantized head
                total += n * head_bpw / 8
        elif name.endswith("lm_head.weight"):
            total += n * head_bpw / 8
        elif len(info.shape) == 2:
            total += n * bits / 8
        else:
            total += n * 2
    return int(total)


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

class EXL2Backend:
    """EXL2 models for exllamav2 / TabbyAPI, calibrated on Russian text; needs CUDA."""

    name = "exl2"
    description = "EXL2 (exllamav2, CUDA)"
    options_model = EXL2Options

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
                       exllamav2=_tool_version("exllamav2"))

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
                       calibration_perplexity=cal_ppl, exllamav2=_tool_version("exllamav2"))
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
            "tools": {"quantkit": __version__, "exllamav2": step.get("exllamav2") or _tool_version("exllamav2"),
                      "torch": _tool_version("torch")},
            "command": ctx.command,
        }
        art = Artifact(format="exl2", quant=name, path=final, files=files, size=sum(p.stat().st_size for p in files),
                       bpw=bits, info=info)
        ws.record_artifact(final, **art.to_manifest(ws))
        return art


# -- the converter subprocess ----------------------------------------------------------------------------

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
                                errors="replace", bufsize=1, env=env, cwd=log.parent)
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


# -- scoring ---------------------------------------------------------------------------------------------

class EXL2Scorer:
    """Logits of an EXL2 model through exllamav2 on CUDA, for `quantkit eval`."""

    def __init__(self, path: Path, *, n_ctx: int) -> None:
        try:
            import torch
            from exllamav2 import ExLlamaV2, ExLlamaV2Config
        except ImportError as exc:
            raise MissingDependency(f"cannot load exllamav2: {exc}", INSTALL_HINT) from exc
        except Exception as exc:  # noqa: BLE001 - building its CUDA kernels at import fails in many ways
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise QuantkitError(f"exllamav2 could not build or load its CUDA kernels: {first}",
                                "check the CUDA toolkit (nvcc, CUDA_HOME) matches your torch build") from exc
        self._torch = torch
        self.name = f"exl2:{path.name}"
        config = ExLlamaV2Config(str(path))
        config.max_seq_len = n_ctx
        config.max_input_len = n_ctx
        config.max_attention_size = n_ctx * n_ctx
        self.model = ExLlamaV2(config)
        self.model.load()
        self.n_vocab = int(config.vocab_size)
        self.n_ctx = n_ctx

    def chunk_logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 ``[len(tokens) - first, n_vocab]``: logits at positions ``first .. len(tokens) - 1``."""
        torch = self._torch
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).reshape(1, -1)
        if ids.shape[1] > self.n_ctx:
            raise QuantkitError(f"a chunk of {ids.shape[1]} tokens is longer than the context {self.n_ctx}")
        with torch.inference_mode():
            logits = self.model.forward(ids, cache=None)
        return logits[0, first:, : self.n_vocab].float().cpu().numpy()

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.unload()
            self.model = None
            self._torch.cuda.empty_cache()

