"""`quantkit gptq MODEL --bits 4 --group-size 128`: GPTQ through GPTQModel."""

from __future__ import annotations

from typing import Annotated

import typer

from quantkit.cli.common import run_format
from quantkit.cli.options import (
    DEFAULTS,
    Calibration,
    CalibSamples,
    CalibSeqLen,
    DryRunOpt,
    EvalOpt,
    ForceOpt,
    JsonOpt,
    PrivateOpt,
    PushOpt,
    QuietOpt,
    RepoOpt,
    ThreadsOpt,
    WorkspaceOpt,
    build_options,
    handle_errors,
    setup_output,
)

Model = Annotated[str, typer.Argument(help="Alias, Hub id or local bf16 checkpoint folder.")]
Bits = Annotated[int, typer.Option("--bits", "-b", help="Bits per weight: 2, 3, 4 or 8.")]
GroupSize = Annotated[int, typer.Option("--group-size", "-g", help="Columns per scale/zero group; -1 = per column.")]
DescAct = Annotated[bool, typer.Option("--desc-act/--no-desc-act", help="Act-order: quantize salient columns first.")]
Sym = Annotated[bool, typer.Option("--sym/--no-sym", help="Symmetric quantization (--no-sym stores zero points).")]
Damp = Annotated[float, typer.Option("--damp", help="damp_percent: Hessian dampening, between 0 and 1.")]


@handle_errors
def command(
    model: Model,
    bits: Bits = 4,
    group_size: GroupSize = 128,
    desc_act: DescAct = False,
    sym: Sym = True,
    damp: Damp = 0.05,
    calibration: Calibration = DEFAULTS["calibration"],
    calib_samples: CalibSamples = DEFAULTS["calib_samples"],
    calib_seq_len: CalibSeqLen = DEFAULTS["calib_seq_len"],
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = 0,
    evaluate: EvalOpt = False,
    push: PushOpt = False,
    repo: RepoOpt = None,
    private: PrivateOpt = False,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize a model to GPTQ (GPTQModel), calibrated on Russian text; loads in transformers, vLLM and TGI."""
    from quantkit.backends.gptq import GPTQOptions

    setup_output(quiet, json_output)
    options = build_options(GPTQOptions, "see quantkit gptq --help", bits=bits, group_size=group_size,
                            desc_act=desc_act, sym=sym, damp=damp)
    run_format(
        "gptq", model, options, calibration=calibration, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
        workspace=workspace, json_output=json_output, evaluate=evaluate, push=push, repo=repo, private=private,
        dry_run=dry_run, force=force, threads=threads,
    )
