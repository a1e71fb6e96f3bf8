"""FP8_DYNAMIC in the compressed-tensors format: what llm-compressor writes and vLLM serves, made by quantkit itself.

The folder (``<ws>/fp8/FP8_DYNAMIC``) holds every Linear layer of the decoder as ``<name>.weight`` float8 E4M3
``[out, in]`` with ``<name>.weight_scale`` ``[out, 1]`` in the source dtype (no ``input_scale``: activations are
quantized per token at run time); embeddings, norms, the output head, a MoE router and a vision tower are copied
as they are and named in the config's ``ignore``. The weights are bit-identical to llm-compressor's
(`quantkit.backends.fp8.quantize`), written one block of rows at a time. No calibration: the scales come from the
weights alone.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantkit import console
from quantkit.arch import Architecture
from quantkit.backends.base import JobContext, tool_version, tool_versions
from quantkit.backends.fp8.card import FP8Sections
from quantkit.backends.fp8.options import (
    FP8_EXTRA_HINT,
    FP8Options,
    approx_size,
    estimate_size,
    is_fp8_folder,
)
from quantkit.errors import MissingDependency, QuantkitError
from quantkit.quality.scorers import TransformersScorer
from quantkit.steps import RESOLVE, Step, StepResult, StepRun, step_key
from quantkit.workspace import fingerprint

VERSION = 1  # bump when the bytes written for the same checkpoint and options change
# the architectures whose FP8 files transformers 5.25 + compressed-tensors 0.20 load without a missing weight (the
# routed experts of DeepseekV3 are dequantized into transformers' fused experts; vLLM keeps them in FP8)
VERIFIED = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "DeepseekV3ForCausalLM"})


class FP8Backend(FP8Sections):
    """FP8_DYNAMIC (compressed-tensors) written from the checkpoint's tensors; loads in vLLM and transformers."""

    name = "fp8"
    description = "FP8 W8A8 (FP8_DYNAMIC, compressed-tensors) for vLLM and transformers"
    command_help = ("Quantize a model to FP8 (FP8_DYNAMIC, compressed-tensors, bit-identical to llm-compressor): "
                    "half the size of bf16, near-lossless, served by vLLM; needs no calibration.")
    options_model = FP8Options

    def check(self) -> str | None:
        for module in ("torch", "compressed_tensors"):
            if importlib.util.find_spec(module) is None:
                return f"FP8 needs the fp8 extra: {FP8_EXTRA_HINT}"
        return None

    def supports(self, arch: type[Architecture]) -> str | None:
        """None when transformers + compressed-tensors are known to load this architecture's FP8 files (checked on
        each family's fixture); else why not, before any download."""
        if set(arch.hf_names) & VERIFIED:
            return None
        return (f"FP8 of {'/'.join(arch.hf_names)} has not been checked to load in transformers with "
                "compressed-tensors; quantize its GGUF or GPTQ")

    @staticmethod
    def _options(options: BaseModel) -> FP8Options:
        return options if isinstance(options, FP8Options) else FP8Options.model_validate(options.model_dump())

    def steps(self, ctx: JobContext, options: BaseModel) -> list[Step]:
        """One step per scheme: the streamed quantization of ``model/resolve``'s checkpoint."""
        opts = self._options(options)
        ckpt = ctx.checkpoint
        fp = fingerprint("fp8", VERSION, ckpt.fingerprint, opts.model_dump()) if ckpt is not None else ""
        size = estimate_size(ckpt) if ckpt is not None else approx_size(ctx.n_params)
        return [Step(step_key("fp8", "quantize", opts.quant), "quantize",
                     f"FP8 {opts.quant} (compressed-tensors)", inputs=(RESOLVE,),
                     outputs=(f"fp8/{opts.quant}/",), fingerprint=fp, estimated_size=size, artifact=opts.quant,
                     extra=(("scheme", opts.scheme),), action=lambda run, opts=opts: self._run(run, opts))]

    def _run(self, run: StepRun, opts: FP8Options) -> StepResult:
        from quantkit.backends.fp8.options import plan_items
        from quantkit.backends.fp8.quantize import write_model

        ckpt = run.ctx.checkpoint
        out = run.path(f"fp8/{opts.quant}")
        bar = run.bar
        task = bar.add_task(f"fp8 → {opts.quant}", total=len(plan_items(ckpt))) if bar is not None else None
        console.info(f"fp8 {opts.quant}: quantizing {ckpt.name}")
        start = time.monotonic()
        info = write_model(ckpt, out, opts, version=tool_version("compressed-tensors"),
                           on_item=(lambda _: bar.advance(task)) if bar is not None else None)
        seconds = round(time.monotonic() - start, 1)
        console.info(f"fp8 {opts.quant}: {info['tensors_quantized']} weights in {seconds:.0f} s")
        art = run.artifact(opts.quant, out, bpw=info["bpw"], scheme=opts.scheme, ignore=info["ignore"],
                           tools=tool_versions("torch", "compressed-tensors", missing=False))
        return StepResult(info={"seconds": seconds, **{k: v for k, v in info.items() if k != "bpw"}}, artifacts=art)

    # -- reading artifacts back -------------------------------------------------------------------------

    def owns(self, path: Path) -> bool:
        return is_fp8_folder(path)

    def scorer(self, path: Path, *, n_ctx: int) -> TransformersScorer:
        if not self.owns(path):
            raise QuantkitError(f"{path} is not an FP8 (compressed-tensors) folder",
                                "pass a folder written by `quantkit fp8`")
        if self.check() is not None:
            raise MissingDependency("loading an FP8 model needs compressed-tensors", FP8_EXTRA_HINT)
        return TransformersScorer(Path(path), n_ctx=n_ctx, name=f"fp8:{Path(path).name}", load=load_fp8)


def load_fp8(path: Path, device: str) -> Any:
    """The folder as transformers loads it with compressed-tensors (fp8 weights kept, activations quantized per
    token, as vLLM runs it); a weight the model expects but the files lack is an error, not random values."""
    from transformers import AutoModelForCausalLM

    model, found = AutoModelForCausalLM.from_pretrained(str(path), device_map=device, output_loading_info=True)
    missing = sorted(found.get("missing_keys") or []) + sorted(str(k) for k in found.get("mismatched_keys") or [])
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise QuantkitError(f"{Path(path).name}: transformers found no weights for {missing[0]}{more}",
                            "the files do not match the model's quantization_config; rebuild them")
    return model.eval()
