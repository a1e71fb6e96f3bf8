"""`quantkit exl2 MODEL --bits 4.0,5.0,6.5`: EXL2 models through exllamav2 (needs an NVIDIA GPU)."""

from __future__ import annotations

from typing import Annotated

import typer

from quantkit.backends.exl2 import EXL2Options
from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from quantkit.cli.common import run_format
from quantkit.cli.options import (
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
    WorkspaceOpt,
    build_options,
    handle_errors,
    setup_output,
)


def options_from_cli(**values: object) -> EXL2Options:
    """Validated options; a bad value becomes one clear `QuantkitError`."""
    return build_options(EXL2Options, "e.g. --bits 4.0,5.0,6.5 --head-bits 6", **values)


@handle_errors
def command(
    model: Annotated[str, typer.Argument(help="Alias, Hub id or local folder of the bf16 checkpoint.")],
    bits: Annotated[str, typer.Option("--bits", "-b", help="Target bits per weight, comma-separated.")] = "4.0,5.0,6.5",
    head_bits: Annotated[int, typer.Option("--head-bits", help="Bits of the output head: 2, 3, 4, 5, 6 or 8.")] = 6,
    rows: Annotated[int | None, typer.Option(
        "--rows", min=1, help="Calibration rows for quantizing (default: --calib-samples).")] = None,
    length: Annotated[int | None, typer.Option(
        "--length", min=16, help="Tokens per calibration row (default: --calib-seq-len).")] = None,
    measure_rows: Annotated[int | None, typer.Option(
        "--measure-rows", min=1, help="Rows for the measurement pass (default: --rows).")] = None,
    measure_length: Annotated[int | None, typer.Option(
        "--measure-length", min=16, help="Tokens per measurement row (default: --length).")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=0, help="Largest output shard in MB (0: one file).")]
    = 8192,
    calibration: Calibration = DEFAULT_CALIBRATION,
    calib_samples: CalibSamples = DEFAULT_SAMPLES,
    calib_seq_len: CalibSeqLen = DEFAULT_SEQ_LEN,
    workspace: WorkspaceOpt = None,
    evaluate: EvalOpt = False,
    push: PushOpt = False,
    repo: RepoOpt = None,
    private: PrivateOpt = False,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quantize to EXL2 (exllamav2) at one or more bitrates, calibrated on Russian text; needs an NVIDIA GPU."""
    setup_output(quiet, json_output)
    options = options_from_cli(bits=bits, head_bits=head_bits, rows=rows, length=length, measure_rows=measure_rows,
                               measure_length=measure_length, shard_size=shard_size)
    run_format("exl2", model, options, calibration=calibration, calib_samples=calib_samples,
               calib_seq_len=calib_seq_len, workspace=workspace, json_output=json_output, evaluate=evaluate,
               push=push, repo=repo, private=private, dry_run=dry_run, force=force)
