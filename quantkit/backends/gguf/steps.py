"""The GGUF backend's steps: importance matrix → convert (quantizing every pending type in the same pass) →
quantize × N → measure → size targets → verify, each declared once with its fingerprint and action.

::

    model/calibrate ─▶ gguf/imatrix ─┐
    model/resolve ─▶ gguf/convert/BF16 ─┬─▶ gguf/quantize/Q4_K_M  (made in convert's pass when both are to do)
                                        ├─▶ gguf/measure ─▶ gguf/target/4.5G
                                        └─▶ gguf/verify/<each file>
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import __version__, console
from quantkit.backends.base import JobContext
from quantkit.backends.base import tool_versions as versions_of
from quantkit.backends.gguf.ggufinfo import gguf_stats
from quantkit.backends.gguf.options import APPROX_BPW, FULL_PRECISION, GGUFOptions, is_stock_target, parse_size
from quantkit.errors import QuantkitError
from quantkit.steps import CALIBRATE, RESOLVE, Step, StepResult, StepRun
from quantkit.workspace import check_disk, disk_guard, file_sha256, fingerprint

CONVERTER_VERSION = 2  # bump when the converter's output changes, so finished conversions are redone
IMATRIX_VERSION = 1
VERIFY_VERSION = 3


def tool_versions() -> dict[str, str | None]:
    return {"quantkit": __version__, **versions_of("llama-cpp-python", "gguf", "transformers", "torch", missing=False)}


def _sha(path: Path) -> str:
    return file_sha256(path)[:16]


class GGUFSteps:
    """One `GGUFOptions` variant of a job as steps: names, fingerprints, sizes, and the actions that make them."""

    def __init__(self, ctx: JobContext, options: GGUFOptions) -> None:
        from quantkit.backends.gguf.quantize.core import needs_imatrix, parse_tensor_types

        self.ctx, self.o = ctx, options
        ckpt = ctx.checkpoint
        self.here = ckpt is not None
        self.base_q = options.outtype.upper()
        self.base_rel = f"gguf/{ctx.name}-{self.base_q}.gguf"
        self.split = parse_size(options.split_max_size)
        self.convert_key = f"gguf/convert/{self.base_q}"
        self.fp_convert = fingerprint("convert", CONVERTER_VERSION, ckpt.fingerprint, options.outtype, self.split,
                                      options.pre_tokenizer) if ckpt is not None else ""
        self.imatrix_key: str | None = None
        self.fp_imatrix = ""
        if options.imatrix_file:
            path = Path(options.imatrix_file).expanduser()
            self.imatrix_id = {"spec": f"file:{path.name}", "fingerprint": _sha(path) if path.is_file() else ""}
            self.fp_imatrix = self.imatrix_id["fingerprint"]
        elif options.imatrix:
            from quantkit.calibration.rows import step_fingerprint

            self.imatrix_key = "gguf/imatrix"
            self.fp_imatrix = fingerprint("imatrix", IMATRIX_VERSION, ckpt.fingerprint,
                                          step_fingerprint(ctx)) if ckpt is not None else ""
        self.uses_imatrix = bool(options.imatrix or options.imatrix_file)
        for q in options.types:
            if needs_imatrix(q, parse_tensor_types(options.tensor_types)) and not self.uses_imatrix:
                raise QuantkitError(f"{q} needs an importance matrix", "drop --no-imatrix, or pass --imatrix FILE")

    # -- naming and fingerprints -------------------------------------------------------------------------------
    def rel(self, quant: str) -> str:
        return f"gguf/{self.ctx.name}-{quant}.gguf"

    def _imatrix_inputs(self) -> tuple[str, ...]:
        return (self.imatrix_key,) if self.imatrix_key else ()

    def fp_quantize(self, quant: str) -> str:
        if not self.fp_convert or (self.uses_imatrix and not self.fp_imatrix):
            return ""
        o = self.o
        return fingerprint("quantize", self.fp_convert, quant, self.fp_imatrix if self.uses_imatrix else None,
                           o.tensor_types, o.output_type, o.embedding_type)

    def fp_measure(self) -> str:
        from quantkit.backends.gguf.target import allocate as tg
        from quantkit.backends.gguf.target.measure import METHOD_VERSION

        if not self.fp_convert or (self.uses_imatrix and not self.fp_imatrix):
            return ""
        return fingerprint("target-measure", METHOD_VERSION, self.fp_convert,
                           self.fp_imatrix if self.uses_imatrix else None, [q.name for q in tg.CANDIDATES])

    # -- the steps --------------------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        o, ctx = self.o, self.ctx
        out: list[Step] = []
        if self.imatrix_key:
            out.append(Step(self.imatrix_key, "imatrix", f"imatrix on {ctx.calibration} ({ctx.calib_samples}×"
                            f"{ctx.calib_seq_len} tokens)", inputs=(CALIBRATE,), outputs=("gguf/imatrix.gguf",),
                            fingerprint=self.fp_imatrix, action=self._imatrix))
        quantized = [q for q in o.types if q != self.base_q]
        qkeys = [f"gguf/quantize/{q}" for q in quantized]
        out.append(Step(self.convert_key, "convert", f"convert → {self.base_q}", inputs=(RESOLVE,),
                        outputs=(self.base_rel,), fingerprint=self.fp_convert, estimated_size=self._base_size(),
                        action=self._convert, fuses=() if self.split else tuple(qkeys), artifact=self.base_q))
        for q, key in zip(quantized, qkeys, strict=True):
            out.append(Step(key, "quantize", f"quantize → {q}", inputs=(self.convert_key, *self._imatrix_inputs()),
                            outputs=(self.rel(q),), fingerprint=self.fp_quantize(q),
                            estimated_size=self._quantized_size(q), action=self._quantize, artifact=q))
        if o.targets:
            out.append(Step("gguf/measure", "measure",
                            "measure each tensor's damage per type (one quantization per candidate)",
                            inputs=(self.convert_key, *self._imatrix_inputs()), outputs=("gguf/target-measure.json",),
                            fingerprint=self.fp_measure(), estimated_size=0, action=self._measure))
            from quantkit.backends.gguf.target.measure import METHOD_VERSION

            for t in o.targets:
                stock = (f"gguf/quantize/{t}",) if is_stock_target(t) else ()  # its file's size is the bound
                fp = fingerprint("target", self.fp_measure(), t, METHOD_VERSION,
                                 self.fp_quantize(t) if stock else None) if self.fp_measure() else ""
                out.append(Step(f"gguf/target/{t}", "target", f"quantize → best mix under {t}'s size" if stock
                                else f"quantize → best mix under {t}",
                                inputs=("gguf/measure", self.convert_key, *self._imatrix_inputs(), *stock),
                                outputs=(f"gguf/{ctx.name}-target-{t}-<bpw>bpw.gguf",), fingerprint=fp,
                                estimated_size=self._target_size(t), action=self._target, artifact=t))
        if o.verify:
            makers = [s for s in out if s.artifact is not None]
            # the full-precision file last: its check needs the bf16 reference, which is then ready
            for s in sorted(makers, key=lambda s: s.artifact in FULL_PRECISION):
                name = s.artifact if s.kind != "target" else f"target-{s.artifact}"
                fp = fingerprint("verify", VERIFY_VERSION, s.fingerprint) if s.fingerprint else ""
                out.append(Step(f"gguf/verify/{name}", "verify", f"verify {Path(s.outputs[0]).name}",
                                inputs=(s.key,), fingerprint=fp, action=self._verify))
        return out

    # -- sizes (plans and disk checks) ----------------------------------------------------------------------
    def _approx(self, bits: float) -> int | None:
        return int(self.ctx.n_params * bits / 8) if self.ctx.n_params else None

    def _base_size(self) -> int | None:
        if self.here:
            from quantkit.backends.gguf.convert.converter import gguf_tensor_bytes

            return gguf_tensor_bytes(self.ctx.checkpoint, self.o.outtype)
        return self._approx(APPROX_BPW.get(self.base_q, 16.0))

    def _converted(self) -> Path | None:
        """The converted file (or its first part) when it is in the workspace already."""
        if not self.here or self.ctx.workspace is None:
            return None
        base = self.ctx.workspace.abs(self.base_rel)
        if base.is_file():
            return base
        return next(iter(sorted(base.parent.glob(f"{base.stem}-00001-of-*.gguf"))), None) if base.parent.is_dir() \
            else None

    def _quantized_size(self, quant: str) -> int | None:
        base = self._converted()
        if base is not None:
            try:
                return self.size_bound(base, quant)
            except Exception:  # noqa: BLE001 - a damaged converted file (made again by this run): estimate instead
                pass
        return self._approx(APPROX_BPW.get(quant, 8.5))

    def _target_size(self, target: str) -> int | None:
        if is_stock_target(target):
            return self._quantized_size(target)
        if target.endswith("bpw"):
            return self._approx(float(target[:-3]))
        from quantkit.backends.gguf.target.allocate import parse_size as parse_target

        return parse_target(target)

    def size_bound(self, base: Path, quant: str) -> int:
        """The upper bound of a quantized file's size, read from the converted file (`sizes`)."""
        from quantkit.backends.gguf.quantize.core import parse_ggml_type, parse_tensor_types
        from quantkit.backends.gguf.quantize.sizes import quantized_size_bound

        o = self.o
        return quantized_size_bound(
            base, quant, overrides=parse_tensor_types(o.tensor_types),
            output_type=parse_ggml_type(o.output_type) if o.output_type else None,
            embedding_type=parse_ggml_type(o.embedding_type) if o.embedding_type else None)

    # -- shared by the actions ---------------------------------------------------------------------------------
    def quantize_options(self, quant: str, imatrix: dict[str, np.ndarray] | None, keep_split: bool) -> Any:
        from quantkit.backends.gguf.quantize.core import QuantizeOptions, parse_ggml_type, parse_tensor_types

        o = self.o
        return QuantizeOptions(
            file_type=quant, imatrix=imatrix, tensor_types=parse_tensor_types(o.tensor_types),
            output_type=parse_ggml_type(o.output_type) if o.output_type else None,
            embedding_type=parse_ggml_type(o.embedding_type) if o.embedding_type else None,
            threads=self.ctx.threads, keep_split=keep_split,
        )

    def imatrix(self, run: StepRun) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
        """The importance matrix the quantizations use (read once per run), and what the artifacts say about it."""
        from quantkit.backends.gguf.quantize.imatrix import read_imatrix

        if self.imatrix_key:
            rec = run.input(self.imatrix_key)
            path, info = rec.path, {**rec.info, "imatrix_fingerprint": rec.fingerprint}
        elif self.o.imatrix_file:
            path = Path(self.o.imatrix_file).expanduser()
            if not path.is_file():
                raise QuantkitError(f"imatrix file {path} does not exist", "check --imatrix")
            info = dict(self.imatrix_id)
        else:
            return None, None
        memo = run.shared.setdefault("gguf.imatrix", {})
        key = (str(path), self.fp_imatrix)
        if key not in memo:
            memo[key] = read_imatrix(path)
        return memo[key], info

    def _advise(self, run: StepRun) -> None:
        from quantkit.backends.gguf.quantize.core import RECOMMENDS_IMATRIX

        if not self.uses_imatrix and any(q in RECOMMENDS_IMATRIX for q in self.o.types) \
                and not run.shared.get("gguf.advised"):
            run.shared["gguf.advised"] = True
            console.warn("low-bit types without an importance matrix lose noticeably more quality")

    def _prepare_verify(self, run: StepRun) -> None:
        """Start verification's torch half in a process of its own while this step works (`verify.Prepared`),
        when this run verifies something."""
        if not self.o.verify or "gguf.verify" in run.shared \
                or not any(k.startswith("gguf/verify/") for k in run.pending):
            return
        from quantkit.backends.gguf.verify.checks import Prepared

        ctx = self.ctx
        run.shared["gguf.verify"] = Prepared(ctx.checkpoint, ctx.workspace, ctx.evaluation, ctx.threads)

    def artifact(self, run: StepRun, path: Path, quant: str, imatrix_info: dict[str, Any] | None,
                 step: Step | None = None, **extra: Any) -> dict[str, dict[str, Any]]:
        from quantkit.backends.gguf.ggufinfo import iter_parts

        size, bpw = gguf_stats(path)
        info: dict[str, Any] = {"tools": tool_versions(), "imatrix": imatrix_info is not None, **extra}
        if imatrix_info:
            info["calibration"] = imatrix_info
        return run.artifact(quant, path, files=list(iter_parts(path)), bpw=round(bpw, 3), step=step, **info)

    # -- actions ----------------------------------------------------------------------------------------------
    def _imatrix(self, run: StepRun) -> StepResult:
        from transformers import AutoTokenizer

        from quantkit.backends.gguf.quantize.imatrix import (
            MIN_EXPERT_TOKENS,
            compute_imatrix,
            expert_coverage,
            write_imatrix,
        )
        from quantkit.calibration.rows import rows_of

        ckpt = self.ctx.checkpoint
        cal = rows_of(run)
        rows = cal.rows
        info = {k: cal.info[k] for k in ("spec", "samples", "seq_len", "tokens", "fingerprint", "chat")}
        task = run.bar.add_task(f"imatrix ({rows.size:,} tokens)", total=ckpt.arch.n_layer)
        tok = AutoTokenizer.from_pretrained(ckpt.path)
        bos = tok.bos_token_id if _adds_bos(tok) else None
        sums, counts = compute_imatrix(ckpt, rows, bos=bos, on_layer=lambda i: run.bar.advance(task))
        write_imatrix(run.path("gguf/imatrix.gguf"), sums, counts, datasets=[public_spec(info["spec"])],
                      chunk_size=int(rows.shape[1]))
        coverage = expert_coverage(counts, MIN_EXPERT_TOKENS) or None
        if coverage and coverage["below"]:
            console.warn(f"importance matrix: {coverage['below']} of {coverage['experts']} experts got fewer than "
                         f"{coverage['min_tokens']} calibration tokens ({coverage['unreached']} none); "
                         "raise --calib-samples to cover them")
        return StepResult(info={**info, **({"expert_coverage": coverage} if coverage else {})})

    def _convert(self, run: StepRun) -> StepResult:
        """The unquantized GGUF; every pending quantized file is written in the same pass (`fused`)."""
        from quantkit.backends.gguf.convert.converter import Converter
        from quantkit.backends.gguf.quantize.fused import FusedQuantizer

        ctx, o = self.ctx, self.o
        self._advise(run)
        fused_steps = [s for s in run.fused if s.kind == "quantize"]
        imatrix, imatrix_info = self.imatrix(run) if fused_steps else (None, None)
        self._prepare_verify(run)
        conv = Converter(ctx.checkpoint, o.outtype, pre_tokenizer=o.pre_tokenizer)
        planned = conv.plan()
        task = run.bar.add_task(f"convert → {self.base_q}", total=len(planned))
        dst = run.path(self.base_rel)
        rows = sum(int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1 for t in planned)
        tasks = {s.artifact: run.bar.add_task(f"quantize → {s.artifact}", total=rows) for s in fused_steps}
        outputs = [(str(s.artifact), run.path(s.outputs[0]), self.quantize_options(str(s.artifact), imatrix, False))
                   for s in fused_steps]
        base_bytes = conv.tensor_bytes()
        # files that this run reads again (verification, evaluation, size targets) are better left in the page
        # cache; the others go around it (`quantkit.backends.gguf.quantize.direct_file`)
        direct = not (o.verify or o.targets or ctx.evaluation is not None)
        with FusedQuantizer(outputs, threads=ctx.threads, base_bytes=base_bytes, direct=direct,
                            on_rows=lambda q, n: run.bar.advance(tasks[q], n)) if outputs else nullcontext() as fused, \
                disk_guard(run.final("gguf"), base_bytes):
            files = conv.write(dst, split_max_size=self.split, on_tensor=lambda name, n: run.bar.advance(task),
                               sink=fused)
        if fused is not None:
            fused.remember_hashes(files[0])
        vocab = tokenizer_record(conv.vocab_info) if getattr(conv, "vocab_info", None) else {"model": "?"}
        console.info(f"tokenizer: {vocab['model']}" + (f", pre-tokenizer {vocab['pre']} ({vocab['found_by']})"
                                                        if vocab.get("pre") else ""))
        result = StepResult(outputs=[run.rel(f) for f in files], info={"tokenizer": vocab},
                            artifacts=self.artifact(run, files[0], self.base_q, None, tokenizer=vocab))
        for s in fused_steps:
            made = fused.files(str(s.artifact))
            result.fused[s.key] = StepResult(outputs=[run.rel(f) for f in made], artifacts=self.artifact(
                run, made[0], str(s.artifact), imatrix_info, s, tokenizer=vocab))
        return result

    def _quantize(self, run: StepRun) -> StepResult:
        """One type from the kept converted file, by ``llama_model_quantize`` itself."""
        from quantkit.backends.gguf.quantize.core import quantize

        quant = str(run.step.artifact)
        self._advise(run)
        imatrix, imatrix_info = self.imatrix(run)
        self._prepare_verify(run)
        base = run.input(self.convert_key).path
        dst = run.path(run.step.outputs[0])
        opts = self.quantize_options(quant, imatrix, "-00001-of-" in base.name)
        opts.need = self.size_bound(base, quant)
        check_disk(run.final("gguf"), opts.need, dst.name)
        task = run.bar.add_task(f"quantize → {quant}", total=1)
        files = quantize(base, dst, opts, on_done=lambda: run.bar.advance(task))
        vocab = run.input(self.convert_key).info.get("tokenizer")
        return StepResult(outputs=[run.rel(f) for f in files], artifacts=self.artifact(
            run, files[0], quant, imatrix_info, **({"tokenizer": vocab} if vocab else {})))

    def _measure(self, run: StepRun) -> StepResult:
        from quantkit.backends.gguf.target import measure as targeted

        imatrix, _ = self.imatrix(run)
        base = run.input(self.convert_key).path
        factors = targeted.measure(base, run.path("gguf/target-measure.json"), imatrix, self.ctx.threads, run.bar)
        from quantkit.backends.gguf.target import allocate as tg

        return StepResult(info={"candidates": [q.name for q in tg.CANDIDATES], "factors": factors})

    def _target(self, run: StepRun) -> StepResult:
        from quantkit.backends.gguf.target import measure as targeted

        target = str(run.step.artifact)
        imatrix, imatrix_info = self.imatrix(run)
        self._prepare_verify(run)
        base = run.input(self.convert_key).path
        table = targeted.load_table(run.input("gguf/measure").path)
        bound = None
        if is_stock_target(target):
            bound = sum(f.stat().st_size for f in run.input(f"gguf/quantize/{target}").outputs)
        path, types_file, plan, budget = targeted.write_target(run, self.ctx.name, base, target, table, imatrix,
                                                               self.ctx.threads, budget=bound)
        quant = path.stem.removeprefix(f"{self.ctx.name}-")  # target-4.5G-4.48bpw
        vocab = run.input(self.convert_key).info.get("tokenizer")
        # `replaces`: the stock type whose size it was made at (the evaluation holds it to beating that file)
        art = self.artifact(run, path, quant, imatrix_info, target=target, mix=plan.groups,
                            **({"replaces": target} if bound is not None else {}),
                            **({"tokenizer": vocab} if vocab else {}))
        for entry in art.values():
            entry["files"] = [*entry["files"], run.rel(types_file)]  # published beside the file
        return StepResult(outputs=[run.rel(path), run.rel(types_file)], artifacts=art,
                          info={"target": target, "budget": budget, "predicted": plan.nbytes, "groups": plan.groups})

    def _verify(self, run: StepRun) -> StepResult:
        """The file loads in llama.cpp and tokenizes Russian exactly like the HF tokenizer; an unquantized file's
        next-token distribution matches transformers' float32 forward."""
        from quantkit.backends.gguf.verify.checks import Verifier
        from quantkit.quality.verify import current_hashes
        from quantkit.steps import StepFailure

        (made,) = run.step.inputs
        rec = run.input(made)
        key = rec.artifacts[0] if rec.artifacts else run.ctx.workspace.rel(rec.path)
        quant = run.ctx.workspace.artifacts.get(key, {}).get("quant", "")
        verifier = run.shared.get("gguf.verifier")
        if verifier is None:
            prepared = run.shared.get("gguf.verify")
            ctx = self.ctx
            verifier = prepared.get() if prepared is not None else Verifier(ctx.checkpoint, workspace=ctx.workspace,
                                                                             evaluation=ctx.evaluation)
            run.shared["gguf.verifier"] = verifier
        sha = current_hashes(run.ctx.workspace, run.ctx.workspace.artifacts.get(key) or {"files": [key]})
        try:
            report = verifier.verify(rec.path, forward=quant in FULL_PRECISION)
        except QuantkitError as exc:  # remembered, so that `quantkit push` refuses the file (unless --force)
            raise StepFailure(exc.message, exc.hint,
                              updates={key: {"verify": {"passed": False, "error": exc.message, "sha256": sha}}}
                              ) from exc
        report = {"passed": True, **report, "sha256": sha}
        console.info(f"verified {rec.path.name}: " + ", ".join(f"{k}={v}" for k, v in report.items()
                                                                 if k != "sha256"))
        return StepResult(info=report, updates={key: {"verify": report}})


def tokenizer_record(info: Any) -> dict[str, Any]:
    """What the manifest, the card and ``--json`` say about the file's tokenizer: its model, and for byte-level BPE
    the pre-tokenizer name and how it was found (llama.cpp's hash table, the structure of ``tokenizer.json``, a
    trial of every name llama.cpp knows on Russian text plus llama.cpp's own probe text, or --pre-tokenizer)."""
    out: dict[str, Any] = {"model": info.model, "tokens": info.n_tokens}
    if info.model == "gpt2":
        out.update(pre=info.pre, found_by=info.pre_method or "hash")
        if info.pre_method == "trial":
            out["tried_on"] = "builtin:ru-eval (4,000 characters) + llama.cpp's probe text"
    return out


def public_spec(spec: str) -> str:
    """A calibration spec fit for published files: a local file keeps only its name."""
    if spec.startswith(("builtin:", "hf:")):
        return spec
    return Path(spec).name


def _adds_bos(tok: Any) -> bool:
    if tok.bos_token_id is None:
        return False
    ids = tok("а")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id
