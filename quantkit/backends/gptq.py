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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantkit import __version__, console
from quantkit.arch import Architecture
from quantkit.backends.base import Artifact, JobContext
from quantkit.errors import MissingDependency, QuantkitError
from quantkit.safetensors_io import read_header
from quantkit.source import TOKENIZER_FILES, Checkpoint
from quantkit.workspace import Workspace, check_disk, fingerprint, temp_name, write_json_atomic

GPTQ_EXTRA_HINT = "pip install 'quantkit-ru[gptq]'"
ALLOWED_BITS = (2, 3, 4, 8)
# Group sizes we suggest (GPTQModel accepts any divisor; kernels are built for powers of two).
COMMON_GROUPS = (16, 32, 64, 128, 256, 512, 1024)
# Files copied from the source checkpoint as they are (GPTQModel rewrites its own versions of some).
COPIED_FILES = (*TOKENIZER_FILES, "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
# Sanitized out of the published configs: machine-specific fields of GPTQModel's `meta`.
_MACHINE_KEYS = {"offload_to_disk_path"}
CPU_INT4_GROUPS = (32, 64, 128)  # group sizes GPTQModel's CPU int4pack kernel handles
_MAX_CPU_WORKERS = 12  # GPTQModel's own cap on its CPU worker pool


class GPTQOptions(BaseModel):
    """Options of one GPTQ quantization."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, description="bits per weight: 2, 3, 4 or 8")
    group_size: int = Field(128, description="columns sharing one scale/zero; -1 = one group per output column")
    desc_act: bool = Field(False, description="quantize columns in order of decreasing activation (act-order)")
    sym: bool = Field(True, description="symmetric quantization (no per-group zero offset)")
    damp: float = Field(0.05, description="damp_percent: fraction of the mean Hessian diagonal added to it")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"--bits must be one of {', '.join(map(str, ALLOWED_BITS))}, not {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError(f"--group-size must be a positive number of columns or -1, not {v}")
        return v

    @field_validator("damp")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"--damp must be between 0 and 1 (exclusive), not {v}")
        return v

    @property
    def quant(self) -> str:
        """The artifact's name: ``4bit-g128``, ``4bit-g-1``, with ``-desc`` / ``-asym`` when not the default."""
        name = f"{self.bits}bit-g{self.group_size}"
        return name + ("-desc" if self.desc_act else "") + ("-asym" if not self.sym else "")


# -- pure helpers (no heavy imports) ------------------------------------------------------------------------

def quantized_layers(ckpt: Checkpoint) -> dict[str, tuple[int, int]]:
    """Every Linear weight GPTQModel will quantize → ``(out_features, in_features)``, from the safetensors headers."""
    pattern = ckpt.arch.gptq_layers
    return {name: (info.shape[0], info.shape[1]) for name, info in ckpt.tensors.tensors.items()
            if pattern.match(name) and len(info.shape) == 2}


def check_group_size(ckpt: Checkpoint, group_size: int) -> None:
    """Refuse a group size that does not divide every quantized layer's input width, naming the layer.

    GPTQModel quantizes such a model, but the CPU int4 kernel then fails to load it (see FACTS.md).
    """
    layers = quantized_layers(ckpt)
    if not layers:
        raise QuantkitError(f"{ckpt.name} has no decoder Linear layers that GPTQ can quantize",
                            "GPTQ quantizes the decoder layers of the architectures `quantkit models` lists")
    if group_size == -1:
        return
    widths = {name: shape[1] for name, shape in layers.items()}
    bad = next((n for n, w in widths.items() if w % group_size), None)
    if bad is None:
        return
    good = [g for g in COMMON_GROUPS if all(w % g == 0 for w in widths.values())]
    layer = re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", bad.removesuffix(".weight"))
    raise QuantkitError(
        f"--group-size {group_size} does not divide the input width {widths[bad]} of {layer}",
        f"group sizes that work for {ckpt.name}: {', '.join(map(str, good))}, or -1 for one group per column",
    )


def estimate_size(ckpt: Checkpoint, opts: GPTQOptions) -> int:
    """Bytes of the saved model: packed weights, fp16 scales, packed zeros and g_idx of quantized layers,
    the rest (embeddings, norms, output head) as in the source."""
    layers = quantized_layers(ckpt)
    total = 0
    for name, info in ckpt.tensors.tensors.items():
        if name not in layers:
            total += info.nbytes
            continue
        out_f, in_f = layers[name]
        groups = 1 if opts.group_size == -1 else in_f // opts.group_size
        total += out_f * in_f * opts.bits // 8  # qweight
        total += groups * out_f * (2 + opts.bits / 8)  # scales (fp16) + qzeros
        total += in_f * 4  # g_idx
    return int(total)


def bits_per_weight(folder: Path) -> float | None:
    """Stored bits per weight over the quantized layers (qweight + qzeros + scales + g_idx), from the headers."""
    stored = weights = 0
    tensors: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(read_header(file)[0])
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        parts = [tensors.get(f"{base}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")]
        if any(p is None for p in parts):
            continue
        in_f, out_f = parts[3].shape[0], parts[2].shape[1]
        stored += sum(p.nbytes for p in parts) * 8
        weights += in_f * out_f
    return round(stored / weights, 4) if weights else None


def _plan_key(ctx: JobContext, opts: GPTQOptions) -> str:
    """What decides the output, as far as is known without tokenizing (for --dry-run)."""
    return fingerprint(ctx.checkpoint.fingerprint, str(ctx.calibration), ctx.calib_samples, ctx.calib_seq_len,
                       ctx.seed, ctx.checkpoint.instruct, opts.model_dump())


def _sanitize(obj: Any, roots: list[str]) -> Any:
    """A JSON value without machine-specific fields or absolute paths (values under `roots`, or any ``/...``)."""
    if isinstance(obj, dict):
        return {k: _sanitize(v, roots) for k, v in obj.items() if k not in _MACHINE_KEYS}
    if isinstance(obj, list):
        return [_sanitize(v, roots) for v in obj]
    if isinstance(obj, str) and (os.path.isabs(obj) or any(r and r in obj for r in roots)):
        return None
    return obj


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("gptqmodel", "transformers", "torch", "optimum"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


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

class GPTQBackend:
    """GPTQ (GPTQModel) with quantkit's calibration rows; output loads in transformers, vLLM and TGI."""

    name = "gptq"
    description = "GPTQ int2/3/4/8 through GPTQModel (transformers, vLLM, TGI)"
    options_model = GPTQOptions

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
        fp = fingerprint(ckpt.fingerprint, calib["fingerprint"], opts.model_dump())
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
        from transformers import AutoTokenizer

        from quantkit.calibration import token_rows

        tokenizer = AutoTokenizer.from_pretrained(str(ctx.checkpoint.path))
        rows = token_rows(ctx.calibration, tokenizer, n_samples=ctx.calib_samples, seq_len=ctx.calib_seq_len,
                          seed=ctx.seed, chat=ctx.checkpoint.instruct)
        return rows, {"chat_template": bool(ctx.checkpoint.instruct and getattr(tokenizer, "chat_template", None))}

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
               "threads": ctx.threads, **opts.model_dump()}
        write_json_atomic(work / "job.json", job)
        env = dict(os.environ)
        workers = min(ctx.threads or _cpu_count(), _cpu_count(), _MAX_CPU_WORKERS)
        env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, workers)))
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
                  "damp_percent": opts.damp, "calibration": calibration, "tools": _versions(),
                  "command": ctx.command, "fingerprint": fp},
        )

    # -- reading artifacts back -------------------------------------------------------------------------

    def owns(self, path: Path) -> bool:
        config = Path(path) / "config.json"
        if not config.is_file():
            return False
        try:
            qcfg = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
        return isinstance(qcfg, dict) and qcfg.get("quant_method") == "gptq"

    def scorer(self, path: Path, *, n_ctx: int) -> TransformersScorer:
        if not self.owns(path):
            raise QuantkitError(f"{path} is not a GPTQ folder", "pass a folder written by `quantkit gptq`")
        if self.check() is not None:
            raise MissingDependency("scoring a GPTQ model needs gptqmodel", GPTQ_EXTRA_HINT)
        return TransformersScorer(Path(path), n_ctx=n_ctx, name=f"gptq:{Path(path).name}")



_HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


@contextlib.contextmanager
def _hub_env_kept() -> Iterator[None]:
    """GPTQModel's dependency tokenicer sets HF_HOME (to /tmp/tokenicer_hf_home when unset) and HF_HUB_CACHE in
    ``os.environ`` when it is imported; put them back, so later Hub downloads in this process (the next model of a
    recipe) still use the user's cache."""
    saved = {k: os.environ.get(k) for k in _HUB_ENV}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_routed_experts(path: Path) -> bool:
    """transformers 5 holds routed experts fused in 3-D tensors and cannot load GPTQ's per-expert weights into them
    (it would leave the experts randomly initialised); GPTQModel's own loader keeps one module per expert."""
    from quantkit.arch import lookup

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cls = lookup((config.get("architectures") or [""])[0])
    return bool(cls and cls.routed_experts)


class TransformersScorer:
    """Next-token logits from a Hugging Face model folder (bf16, or GPTQ through optimum + GPTQModel kernels);
    CUDA when available, else CPU. GPTQModel's console output is sent to stderr."""

    def __init__(self, path: Path, *, n_ctx: int, name: str | None = None) -> None:
        import torch

        self.name = name or Path(path).name
        self.n_ctx = n_ctx
        self.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        with contextlib.redirect_stdout(sys.stderr), _hub_env_kept():
            self.model = self._load(Path(path))
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])

    def _load(self, path: Path) -> Any:
        quantized = GPTQBackend().owns(path)
        if quantized and (importlib.util.find_spec("optimum") is None or _has_routed_experts(path)):
            from gptqmodel import GPTQModel  # transformers needs optimum for GPTQ; GPTQModel loads it alone

            return GPTQModel.load(str(path), device=self.device).model.eval()
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {}
        if quantized and self.device == "cpu":
            qcfg = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
            if not (qcfg.get("bits") == 4 and qcfg.get("group_size") in CPU_INT4_GROUPS):
                from transformers import GPTQConfig

                # GPTQModel 7.6 picks its CPU int4pack kernel for g-1/g16 too, which then fails at the first
                # forward ("expect qGroupSize to be 32, 64, 128 or 256"); its plain torch kernel takes any layout
                kwargs["quantization_config"] = GPTQConfig(bits=qcfg.get("bits", 4), backend="gptq_torch")
        try:
            with warnings.catch_warnings():  # "the quantization_config from the model will be used": intended
                warnings.filterwarnings("ignore", message=".*passed `quantization_config`", category=UserWarning)
                return AutoModelForCausalLM.from_pretrained(str(path), device_map=self.device, **kwargs).eval()
        except ImportError as exc:
            raise MissingDependency(f"cannot load {path.name}: {exc}", GPTQ_EXTRA_HINT) from exc

    def chunk_logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        import torch

        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) > self.n_ctx:
            raise ValueError(f"chunk of {len(tokens)} tokens is longer than n_ctx={self.n_ctx}")
        if not 0 <= first < len(tokens):
            raise ValueError(f"first={first} is outside the chunk of {len(tokens)} tokens")
        ids = torch.from_numpy(tokens).unsqueeze(0).to(self.device)
        with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
            logits = self.model(input_ids=ids, use_cache=False).logits[0, first:]
        return logits.float().cpu().numpy()

    def close(self) -> None:
        import gc

        self.model = None
        gc.collect()


# -- the child process --------------------------------------------------------------------------------------

def _worker(job_path: str) -> None:
    """Quantize with GPTQModel as `job_path` says (run in a child process by `GPTQBackend._quantize`)."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from gptqmodel import GPTQModel, QuantizeConfig

    rows = np.load(job["rows"])
    calibration = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in rows]
    qcfg = QuantizeConfig(
        bits=job["bits"], group_size=job["group_size"], desc_act=job["desc_act"], sym=job["sym"],
        damp_percent=job["damp"], format="gptq", pack_impl="original",
        # GPTQModel's default "group-aware reordering" conflicts with act-order and needs groups
        act_group_aware=not job["desc_act"] and job["group_size"] > 0,
        offload_to_disk=True, offload_to_disk_path=job["offload"],
    )
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = GPTQModel.load(job["source"], qcfg, device=device)
    model.quantize(calibration, batch_size=1)
    model.save(job["output"])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m quantkit.backends.gptq JOB.json")
    _worker(sys.argv[1])
