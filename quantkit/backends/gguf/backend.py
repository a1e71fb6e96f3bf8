"""The GGUF backend: convert → importance matrix → quantize × N → verify, every step resumable."""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import __version__, console
from quantkit.backends.base import Artifact, JobContext
from quantkit.backends.base import tool_versions as versions_of
from quantkit.backends.gguf.card import GGUFSections
from quantkit.backends.gguf.options import APPROX_BPW, GGUFOptions, parse_size  # noqa: F401 - re-exported
from quantkit.errors import QuantkitError
from quantkit.workspace import OUTPUT_CHECKS, Workspace, disk_guard, file_sha256, fingerprint

CONVERTER_VERSION = 2  # bump when the converter's output changes, so finished conversions are redone


def _check_gguf(path: Path) -> None:
    from quantkit.backends.gguf.check import check_gguf

    check_gguf(path)


OUTPUT_CHECKS[".gguf"] = _check_gguf  # no GGUF is recorded as finished unless it parses and holds all its data


def tool_versions() -> dict[str, str | None]:
    return {"quantkit": __version__, **versions_of("llama-cpp-python", "gguf", "transformers", "torch", missing=False)}


def gguf_stats(path: Path) -> tuple[int, float]:
    """Bytes on disk (all split parts) and bits per weight over every tensor (from the tensor table alone)."""
    from quantkit.backends.gguf.convert import iter_parts
    from quantkit.backends.gguf.ggufinfo import read_info

    size = 0
    bits = 0
    elements = 0
    for part in iter_parts(path):
        size += part.stat().st_size
        reader = read_info(part)
        for t in reader.tensors:
            bits += int(t.n_bytes) * 8
            elements += int(t.n_elements)
    return size, (bits / elements if elements else 0.0)


def _sha(path: Path) -> str:
    return file_sha256(path)[:16]


class GGUFBackend(GGUFSections):
    """llama.cpp GGUF: K- and I-quants with a Russian importance matrix."""

    name = "gguf"
    description = "GGUF for llama.cpp / ollama / LM Studio (K- and I-quants, imatrix)"
    options_model = GGUFOptions

    def check(self) -> str | None:
        try:
            import gguf  # noqa: F401
            import llama_cpp  # noqa: F401
        except ImportError:
            return "GGUF needs llama-cpp-python and gguf: pip install 'quantkit-ru[gguf]'"
        return None

    # -- naming ------------------------------------------------------------------------------------------
    @staticmethod
    def file_for(ws: Workspace, model: str, quant: str) -> Path:
        return ws.root / "gguf" / f"{model}-{quant}.gguf"

    def _split_name(self, path: Path, n_parts: int) -> Path:
        return path.with_name(f"{path.stem}-00001-of-{n_parts:05d}.gguf")

    # -- plan --------------------------------------------------------------------------------------------
    def plan(self, ctx: JobContext, options: GGUFOptions) -> list[dict[str, Any]]:
        from quantkit.backends.gguf.convert import gguf_tensor_bytes
        from quantkit.backends.gguf.quantize import NEEDS_IMATRIX

        ckpt, ws = ctx.checkpoint, ctx.workspace
        base_q = options.outtype.upper()
        base = self.file_for(ws, ckpt.name, base_q)
        fp_conv = self._fp_convert(ctx, options)
        steps: list[dict[str, Any]] = [{
            "step": f"convert → {base_q}", "output": ws.rel(base) if base.is_relative_to(ws.root) else str(base),
            "estimated_size": gguf_tensor_bytes(ckpt, options.outtype), "done": ws.is_done("gguf.convert", fp_conv),
        }]
        use_imatrix = options.imatrix or options.imatrix_file
        imatrix_info: dict[str, Any] | None = None
        if options.imatrix_file:
            path = Path(options.imatrix_file)
            imatrix_info = {"fingerprint": _sha(path)} if path.exists() else None
        elif use_imatrix:
            _, info, fp_imatrix = self._calibration(ctx)  # cheap: tokenizing (or the cached rows)
            imatrix_info = {**info, "imatrix_fingerprint": fp_imatrix}
            steps.append({"step": f"imatrix on {ctx.calibration} ({ctx.calib_samples}×{ctx.calib_seq_len} tokens)",
                          "output": "gguf/imatrix.gguf", "estimated_size": None,
                          "done": ws.is_done("gguf.imatrix", fp_imatrix)})
        n = ckpt.n_params
        converted = steps[0]["done"]
        for q in options.types:
            if q in NEEDS_IMATRIX and not use_imatrix:
                raise QuantkitError(f"{q} needs an importance matrix", "drop --no-imatrix, or pass --imatrix FILE")
            fp_q = self._fp_quantize(fp_conv, q, options, imatrix_info)
            steps.append({"step": f"quantize → {q}", "output": f"gguf/{ckpt.name}-{q}.gguf",
                          "estimated_size": self._size_bound(ws, base, q, options) if converted
                          else int(n * APPROX_BPW.get(q, 8.5) / 8),
                          "done": ws.is_done(f"gguf.quantize.{q}", fp_q)})
        if options.targets:
            steps.append({"step": "measure each tensor's damage per type (one quantization per candidate)",
                          "output": "gguf/target-measure.json", "estimated_size": 0,
                          "done": "gguf.target.measure" in ws.steps})
        for t in options.targets:
            size = None if t.endswith("bpw") else self._target_budget(t)
            steps.append({"step": f"quantize → best mix under {t}", "output": f"gguf/{ckpt.name}-<bpw>bpw.gguf",
                          "estimated_size": size or int(n * float(t[:-3]) / 8),
                          "done": f"gguf.target.{t}" in ws.steps})
        return steps

    @staticmethod
    def _target_budget(target: str) -> int:
        from quantkit.backends.gguf.target import parse_size

        return parse_size(target)

    @staticmethod
    def _size_bound(ws: Workspace, base: Path, quant: str, options: GGUFOptions) -> int:
        """The upper bound of a quantized file's size, read from the converted file (`sizes`)."""
        from quantkit.backends.gguf.quantize import parse_ggml_type, parse_tensor_types
        from quantkit.backends.gguf.sizes import quantized_size_bound

        first = ws.abs(ws.steps["gguf.convert"]["outputs"][0]) if "gguf.convert" in ws.steps else base
        return quantized_size_bound(
            first, quant, overrides=parse_tensor_types(options.tensor_types),
            output_type=parse_ggml_type(options.output_type) if options.output_type else None,
            embedding_type=parse_ggml_type(options.embedding_type) if options.embedding_type else None)

    # -- run ---------------------------------------------------------------------------------------------
    def _fp_convert(self, ctx: JobContext, options: GGUFOptions) -> str:
        return fingerprint("convert", CONVERTER_VERSION, ctx.checkpoint.fingerprint, options.outtype,
                           parse_size(options.split_max_size), options.pre_tokenizer)

    def run(self, ctx: JobContext, options: GGUFOptions) -> list[Artifact]:
        from quantkit.backends.gguf.quantize import NEEDS_IMATRIX, RECOMMENDS_IMATRIX

        ws = ctx.workspace
        use_imatrix = options.imatrix or bool(options.imatrix_file)
        for q in options.types:
            if q in NEEDS_IMATRIX and not use_imatrix:
                raise QuantkitError(f"{q} needs an importance matrix", "drop --no-imatrix, or pass --imatrix FILE")
        if not use_imatrix and any(q in RECOMMENDS_IMATRIX for q in options.types):
            console.warn("low-bit types without an importance matrix lose noticeably more quality")
        tools = tool_versions()
        artifacts: list[Artifact] = []
        with ExitStack() as stack:
            with console.progress() as bar:
                imatrix_data, imatrix_info = (None, None)
                if use_imatrix:  # first: the pass below quantizes while it converts, with the matrix at hand
                    imatrix_data, imatrix_info = self._imatrix(ctx, options, bar)
                prepared = self._prepare_verify(ctx, options)
                if prepared is not None:
                    stack.callback(prepared.close)  # its process is stopped on errors and interrupts too
                base, fp_base, fused = self._convert(ctx, options, bar, imatrix_data, imatrix_info)
                artifacts.append(self._artifact(ws, base, options.outtype.upper(), fp_base, ctx, tools, None))
                for q in options.types:
                    if q == options.outtype.upper():
                        continue
                    path, fp = fused.get(q) or self._quantize(ctx, options, base, fp_base, q, imatrix_data,
                                                              imatrix_info, bar)
                    artifacts.append(self._artifact(ws, path, q, fp, ctx, tools, imatrix_info))
                artifacts += self._targets(ctx, options, base, fp_base, imatrix_data, imatrix_info, tools, bar)
            if options.verify:
                self._verify(ctx, artifacts, prepared)
        return artifacts

    def _targets(self, ctx: JobContext, options: GGUFOptions, base: Path, fp_base: str, imatrix: Any,
                 imatrix_info: dict[str, Any] | None, tools: dict[str, str], bar: Any) -> list[Artifact]:
        """Size-targeted files (`quantkit.backends.gguf.targeted`): one measurement, one file per target."""
        if not options.targets:
            return []
        from quantkit.backends.gguf import targeted

        ws = ctx.workspace
        table, measure_fp = targeted.measured_table(ws, base, fp_base, imatrix,
                                                    (imatrix_info or {}).get("imatrix_fingerprint"), ctx.threads, bar)
        out = []
        for target in options.targets:
            path, fp, plan = targeted.write_target(ws, ctx.checkpoint.name, base, target, table, measure_fp, imatrix,
                                                   ctx.threads, bar)
            art = self._artifact(ws, path, path.stem.rsplit("-", 1)[-1], fp, ctx, tools, imatrix_info)
            types_file = path.with_suffix(".tensor-types.txt")  # published beside the file
            art.files = [*(art.files or [path]), types_file]
            ws.update_artifact(ws.rel(path), target=target, mix=plan.groups, files=[ws.rel(f) for f in art.files])
            art.info.update(target=target, mix=plan.groups)
            out.append(art)
        return out

    def _artifact(self, ws: Workspace, path: Path, quant: str, fp: str, ctx: JobContext, tools: dict[str, str],
                  imatrix_info: dict[str, Any] | None) -> Artifact:
        from quantkit.backends.gguf.convert import iter_parts

        files = list(iter_parts(path))
        size, bpw = gguf_stats(path)
        info: dict[str, Any] = {"fingerprint": fp, "tools": tools, "command": ctx.command,
                                "imatrix": imatrix_info is not None}
        if imatrix_info:
            info["calibration"] = imatrix_info
        art = Artifact("gguf", quant, path, files, size, round(bpw, 3), info)
        entry = ws.record_artifact(path, **art.to_manifest(ws))
        art.info.update({k: entry[k] for k in ("eval", "gate") if k in entry})
        return art

    def _convert(self, ctx: JobContext, options: GGUFOptions, bar: Any, imatrix: dict[str, np.ndarray] | None,
                 imatrix_info: dict[str, Any] | None) -> tuple[Path, str, dict[str, tuple[Path, str]]]:
        """The unquantized GGUF; when it has to be written (and is not split), every pending quantized file is
        written in the same pass (`fused`). Returns the file, its fingerprint, and quant → (file, fingerprint) of
        the files made in the pass."""
        from quantkit.backends.gguf.convert import Converter
        from quantkit.backends.gguf.fused import FusedQuantizer

        ckpt, ws = ctx.checkpoint, ctx.workspace
        quant = options.outtype.upper()
        fp = self._fp_convert(ctx, options)
        if ws.is_done("gguf.convert", fp):
            console.info(f"[dim]skip[/] conversion: {ws.steps['gguf.convert']['outputs'][0]} is up to date")
            return ws.abs(ws.steps["gguf.convert"]["outputs"][0]), fp, {}
        conv = Converter(ckpt, options.outtype, pre_tokenizer=options.pre_tokenizer)
        planned = conv.plan()
        task = bar.add_task(f"convert → {quant}", total=len(planned))
        dst = self.file_for(ws, ckpt.name, quant)
        split = parse_size(options.split_max_size)
        fps = {q: self._fp_quantize(fp, q, options, imatrix_info) for q in options.types if q != quant}
        pending = [] if split else [q for q, fp_q in fps.items() if not ws.is_done(f"gguf.quantize.{q}", fp_q)]
        rows = sum(int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1 for t in planned)
        tasks = {q: bar.add_task(f"quantize → {q}", total=rows) for q in pending}
        outputs = [(q, self.file_for(ws, ckpt.name, q), self._quantize_options(ctx, options, q, imatrix, False))
                   for q in pending]
        base_bytes = conv.tensor_bytes()
        # files that this run reads again (verification, evaluation, size targets) are better left in the page
        # cache; the others go around it (`quantkit.direct_file`)
        direct = not (options.verify or options.targets or ctx.evaluation is not None)
        with FusedQuantizer(outputs, threads=ctx.threads, base_bytes=base_bytes, direct=direct,
                            on_rows=lambda q, n: bar.advance(tasks[q], n)) if outputs else nullcontext() as fused, \
                disk_guard(dst.parent, base_bytes):
            files = conv.write(dst, split_max_size=split, on_tensor=lambda name, n: bar.advance(task), sink=fused)
        if fused is not None:
            fused.remember_hashes(files[0])
        ws.record_step("gguf.convert", fp, files)
        made: dict[str, tuple[Path, str]] = {}
        for q in pending:
            ws.record_step(f"gguf.quantize.{q}", fps[q], fused.files(q))
            made[q] = (fused.files(q)[0], fps[q])
        return files[0], fp, made

    @staticmethod
    def _quantize_options(ctx: JobContext, options: GGUFOptions, quant: str, imatrix: dict[str, np.ndarray] | None,
                          keep_split: bool) -> Any:
        from quantkit.backends.gguf.quantize import QuantizeOptions, parse_ggml_type, parse_tensor_types

        return QuantizeOptions(
            file_type=quant, imatrix=imatrix, tensor_types=parse_tensor_types(options.tensor_types),
            output_type=parse_ggml_type(options.output_type) if options.output_type else None,
            embedding_type=parse_ggml_type(options.embedding_type) if options.embedding_type else None,
            threads=ctx.threads, keep_split=keep_split,
        )

    def _calibration(self, ctx: JobContext) -> tuple[np.ndarray, dict[str, Any], str]:
        """The job's calibration rows (built once per workspace, shared with other formats), their description,
        and the imatrix step's fingerprint."""
        from quantkit.calibration_rows import calibration_rows

        cal = calibration_rows(ctx)
        info = {k: cal.info[k] for k in ("spec", "samples", "seq_len", "tokens", "fingerprint", "chat")}
        return cal.rows, info, fingerprint("imatrix", ctx.checkpoint.fingerprint, info)

    def _fp_quantize(self, fp_base: str, quant: str, options: GGUFOptions, imatrix_info: dict[str, Any] | None) -> str:
        return fingerprint("quantize", fp_base, quant, (imatrix_info or {}).get("imatrix_fingerprint"),
                           (imatrix_info or {}).get("fingerprint"), options.tensor_types, options.output_type,
                           options.embedding_type)

    def _imatrix(self, ctx: JobContext, options: GGUFOptions, bar: Any) -> tuple[dict[str, np.ndarray],
                                                                                  dict[str, Any]]:
        from quantkit.backends.gguf.imatrix import (
            MIN_EXPERT_TOKENS,
            compute_imatrix,
            expert_coverage,
            read_imatrix,
            write_imatrix,
        )

        ws = ctx.workspace
        if options.imatrix_file:
            path = Path(options.imatrix_file)
            if not path.exists():
                raise QuantkitError(f"imatrix file {path} does not exist", "check --imatrix")
            data = read_imatrix(path)
            return data, {"spec": f"file:{path.name}", "fingerprint": _sha(path)}
        ckpt = ctx.checkpoint
        rows, info, fp = self._calibration(ctx)
        out = ws.root / "gguf" / "imatrix.gguf"
        if ws.is_done("gguf.imatrix", fp):
            console.info("[dim]skip[/] importance matrix: gguf/imatrix.gguf is up to date")
            coverage = ws.steps["gguf.imatrix"].get("info", {}).get("expert_coverage")
        else:
            task = bar.add_task(f"imatrix ({rows.size:,} tokens)", total=ckpt.arch.n_layer)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(ckpt.path)
            bos = tok.bos_token_id if _adds_bos(tok) else None
            sums, counts = compute_imatrix(ckpt, rows, bos=bos, on_layer=lambda i: bar.advance(task))
            write_imatrix(out, sums, counts, datasets=[public_spec(info["spec"])], chunk_size=int(rows.shape[1]))
            coverage = expert_coverage(counts, MIN_EXPERT_TOKENS) or None
            ws.record_step("gguf.imatrix", fp, [out], **info, **({"expert_coverage": coverage} if coverage else {}))
        if coverage and coverage["below"]:
            console.warn(f"importance matrix: {coverage['below']} of {coverage['experts']} experts got fewer than "
                         f"{coverage['min_tokens']} calibration tokens ({coverage['unreached']} none); "
                         "raise --calib-samples to cover them")
        extra = {"expert_coverage": coverage} if coverage else {}
        return read_imatrix(out), {**info, **extra, "imatrix_fingerprint": fp}

    def _quantize(self, ctx: JobContext, options: GGUFOptions, base: Path, fp_base: str, quant: str,
                  imatrix: dict[str, np.ndarray] | None, imatrix_info: dict[str, Any] | None,
                  bar: Any) -> tuple[Path, str]:
        from quantkit.backends.gguf.quantize import quantize
        from quantkit.workspace import check_disk

        ws = ctx.workspace
        step = f"gguf.quantize.{quant}"
        fp = self._fp_quantize(fp_base, quant, options, imatrix_info)
        dst = self.file_for(ws, ctx.checkpoint.name, quant)
        if ws.is_done(step, fp):
            console.info(f"[dim]skip[/] {quant}: {ws.steps[step]['outputs'][0]} is up to date")
            return ws.abs(ws.steps[step]["outputs"][0]), fp
        opts = self._quantize_options(ctx, options, quant, imatrix, "-00001-of-" in base.name)
        opts.need = self._size_bound(ws, base, quant, options)
        check_disk(dst.parent, opts.need, dst.name)
        task = bar.add_task(f"quantize → {quant}", total=1)
        files = quantize(base, dst, opts, on_done=lambda: bar.advance(task))
        ws.record_step(step, fp, files)
        return files[0], fp

    # -- verification ------------------------------------------------------------------------------------
    @staticmethod
    def _prepare_verify(ctx: JobContext, options: GGUFOptions) -> Any:
        """Verification's set-up, started in the background while quantization runs (`verify.Prepared`); None when
        verification is off or every file's verification is already recorded."""
        steps = ctx.workspace.steps
        if not options.verify or all(f"gguf.verify.{q}" in steps for q in (options.outtype.upper(), *options.types)):
            return None
        from quantkit.backends.gguf.verify import Prepared

        return Prepared(ctx.checkpoint, ctx.workspace, ctx.evaluation, ctx.threads)

    def _verify(self, ctx: JobContext, artifacts: list[Artifact], prepared: Any = None) -> None:
        """Every file loads in llama.cpp and tokenizes Russian exactly like the HF tokenizer; the unquantized
        file's next-token distribution matches transformers' bf16 forward."""
        from quantkit.backends.gguf.verify import Verifier

        verifier = None
        forward = ("BF16", "F16", "F32")
        for art in sorted(artifacts, key=lambda a: a.quant in forward):  # those that need the reference last
            step = f"gguf.verify.{art.quant}"
            # the file's hash as its own step recorded it: verifying does not hash gigabytes again
            fp = fingerprint("verify", 2, art.info["fingerprint"], _recorded_sha(ctx.workspace, art.path))
            if ctx.workspace.is_done(step, fp):
                continue
            try:
                verifier = verifier or (prepared.get() if prepared is not None
                                        else Verifier(ctx.checkpoint, workspace=ctx.workspace,
                                                      evaluation=ctx.evaluation))
                report = verifier.verify(art.path, forward=art.quant in forward)
            except QuantkitError as exc:  # remembered, so that `quantkit push` refuses the file (unless --force)
                ctx.workspace.update_artifact(ctx.workspace.rel(art.path),
                                              verify={"passed": False, "error": exc.message})
                raise
            report = {"passed": True, **report}
            ctx.workspace.record_step(step, fp, [], **report)
            ctx.workspace.update_artifact(ctx.workspace.rel(art.path), verify=report)
            console.info(f"verified {art.path.name}: " + ", ".join(f"{k}={v}" for k, v in report.items()))

    # -- eval --------------------------------------------------------------------------------------------
    def owns(self, path: Path) -> bool:
        path = Path(path)
        if not (path.is_file() and path.suffix == ".gguf") or path.name.startswith("imatrix"):
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"

    def scorer(self, path: Path, *, n_ctx: int) -> Any:
        from quantkit.backends.gguf.llamacpp import LlamaScorer

        return LlamaScorer(path, n_ctx=n_ctx)



def _recorded_sha(ws: Workspace, path: Path) -> str | None:
    """The sha256 the workspace took of `path` when the step that wrote it finished."""
    rel = ws.rel(path)
    return next((rec["checks"][rel].get("sha256") for rec in ws.steps.values()
                 if rel in (rec.get("checks") or {})), None)


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
