"""`quantkit gguf MODEL --q4_k_m --q5_k_m`: BF16 GGUF, Russian importance matrix, llama.cpp quants."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
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
from quantkit.errors import QuantkitError

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
# options field → its flag
FLAGS = {"tensor_types": "--tensor-type", "imatrix_file": "--imatrix", "pre_tokenizer": "--pre-tokenizer",
         "target_sizes": "--target-size", "target_bpw": "--target-bpw"}


_QUANT_FLAG = re.compile(r"^--(i?q\d|tq\d|bf16|f16|f32)", re.IGNORECASE)


def _flag_types(extra: list[str], options: list[str]) -> list[str]:
    """``--q4_k_m --iq3_xxs`` style flags → file type names; a mistyped option is named as one."""
    from quantkit.backends.gguf.quantize import FILE_TYPES, parse_file_type

    out = []
    for arg in extra:
        if not arg.startswith("--"):
            raise QuantkitError(f"unexpected argument '{arg}'", "see quantkit gguf --help")
        flag = arg.split("=", 1)[0]
        if flag[2:].upper().replace("-", "_") in FILE_TYPES:
            out.append(parse_file_type(flag[2:]))
            continue
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.7)
        if _QUANT_FLAG.match(flag) and not close:
            out.append(parse_file_type(flag[2:]))  # raises: unknown quant type, naming the valid ones
            continue
        hint = f"did you mean {close[0]}?" if close else "see quantkit gguf --help"
        raise QuantkitError(f"no such option: {flag}", hint)
    return out


def _type_file_lines(path: Path | None) -> list[str]:
    """The PATTERN=TYPE lines of a --tensor-type-file (blank lines and # comments skipped)."""
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"cannot read --tensor-type-file {path}: {type(exc).__name__}",
                            "pass a text file with one PATTERN=TYPE a line") from exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise QuantkitError(f"--tensor-type-file {path} holds no PATTERN=TYPE line", "e.g. attn_v=q8_0")
    return lines


@handle_errors
def command(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Alias (quantkit models), Hub id, local folder, or 'demo'.")],
    types: Annotated[str | None, typer.Option("--types", help="Comma list: q4_k_m,q5_k_m,q8_0 (or --q4_k_m flags).")]
    = None,
    outtype: Annotated[str, typer.Option("--outtype", help="Unquantized GGUF type: bf16, f16 or f32.")] = "bf16",
    imatrix_file: Annotated[Path | None, typer.Option("--imatrix", help="Use this GGUF imatrix file.")] = None,
    no_imatrix: Annotated[bool, typer.Option("--no-imatrix", help="Quantize without an importance matrix.")] = False,
    tensor_type: Annotated[list[str] | None, typer.Option(
        "--tensor-type", help="PATTERN=TYPE per-tensor override (repeatable), e.g. attn_v=q8_0.")] = None,
    tensor_type_file: Annotated[Path | None, typer.Option(
        "--tensor-type-file", help="PATTERN=TYPE overrides, one a line (llama-quantize's format; a targeted "
        "file's .tensor-types.txt).")] = None,
    output_type: Annotated[str | None, typer.Option("--output-type", help="Type of output.weight.")] = None,
    embedding_type: Annotated[str | None, typer.Option("--embedding-type", help="Type of token_embd.")] = None,
    split_max_size: Annotated[str | None, typer.Option(
        "--split-max-size", help="Split files larger than this (e.g. 50G) in llama.cpp's split format.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip loading and tokenizer checks.")] = False,
    pre_tokenizer: Annotated[str | None, typer.Option(
        "--pre-tokenizer", help="llama.cpp pre-tokenizer name for a BPE vocabulary (default: detected).")] = None,
    target_size: Annotated[list[str] | None, typer.Option(
        "--target-size", help="Also write the best per-tensor mix under this size (e.g. 4.5G; repeatable).")] = None,
    target_bpw: Annotated[list[float] | None, typer.Option(
        "--target-bpw", help="Also write the best per-tensor mix at this many bits per weight (repeatable).")] = None,
    evaluate: EvalOpt = False,
    calibration: Calibration = DEFAULTS["calibration"],
    calib_samples: CalibSamples = DEFAULTS["calib_samples"],
    calib_seq_len: CalibSeqLen = DEFAULTS["calib_seq_len"],
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = 0,
    push: PushOpt = False,
    repo: RepoOpt = None,
    private: PrivateOpt = False,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert to GGUF, compute a Russian importance matrix, and quantize with llama.cpp.

    Pick types with flags (--q4_k_m --q5_k_m --q8_0 --iq4_xs ...) or --types; default Q4_K_M.
    """
    from quantkit.backends.gguf.backend import GGUFOptions

    setup_output(quiet, json_output)
    names = [o for p in ctx.command.params for o in getattr(p, "opts", []) if o.startswith("--")]
    chosen = _flag_types(ctx.args, names)
    if types is not None:
        listed = [t for t in types.split(",") if t.strip()]
        if not listed:
            raise QuantkitError(f"--types '{types}' names no quant type", "e.g. --types q4_k_m,q8_0")
        chosen += listed
    if no_imatrix and imatrix_file:
        raise QuantkitError("--no-imatrix and --imatrix contradict each other", "use one of them")
    if imatrix_file and not imatrix_file.expanduser().is_file():
        raise QuantkitError(f"the imatrix file {imatrix_file} does not exist", "check --imatrix")
    options = build_options(
        GGUFOptions, "see quantkit gguf --help", flags=FLAGS, types=chosen or ["Q4_K_M"], outtype=outtype,
        imatrix=not no_imatrix, imatrix_file=str(imatrix_file) if imatrix_file else None,
        tensor_types=[*(tensor_type or []), *_type_file_lines(tensor_type_file)], output_type=output_type,
        embedding_type=embedding_type,
        split_max_size=split_max_size, verify=not no_verify, pre_tokenizer=pre_tokenizer,
        target_sizes=target_size or [], target_bpw=target_bpw or [],
    )
    run_format("gguf", model, options, calibration=calibration, calib_samples=calib_samples,
               calib_seq_len=calib_seq_len, workspace=workspace, json_output=json_output, evaluate=evaluate,
               push=push, repo=repo, private=private, dry_run=dry_run, force=force, threads=threads)

