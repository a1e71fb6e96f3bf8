"""EXL2 backend: plan, calibration parquet, config fix, reuse and resume decisions, the CPU refusal; CUDA end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantkit.backends.base import JobContext, get_backend
from quantkit.backends.exl2 import (
    HEAD_BPW,
    EXL2Backend,
    EXL2Options,
    bits_name,
    converter_args,
    fix_config,
    fix_config_file,
    output_complete,
    parse_status,
    prepare_source,
    read_parquet_texts,
    reset_work,
    settings,
    work_state,
)
from quantkit.errors import QuantkitError
from quantkit.pipeline import Made, Step, make, plan_for
from quantkit.source import load_local
from quantkit.workspace import Workspace


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


HAS_CUDA = _cuda()
QUANTKIT = Path(sys.executable).with_name("quantkit")


def _ctx(ckpt: Path, ws: Path, *, command: str = "", **kw: object) -> JobContext:
    return JobContext.of(load_local(ckpt, name=ckpt.name, source=str(ckpt)), Workspace(ws), command=command,
                         **kw)  # type: ignore[arg-type]


def _steps(ctx: JobContext, opts: EXL2Options) -> dict[str, Step]:
    """The EXL2 steps of a job, by key (planned as the executor would run them)."""
    return {s.key: s for s in plan_for(ctx, "exl2", opts) if s.format == "exl2"}


def _run(ctx: JobContext, opts: EXL2Options, *, verify: bool = False) -> list[Made]:
    """Make the EXL2 artifacts; the stand-in converter writes no loadable model, so verification is left out."""
    keys = [k for k, s in _steps(ctx, opts).items() if verify or s.kind != "verify"]
    return make(ctx, "exl2", opts, only={"model/resolve", *keys})


def _tokenizer(path: Path):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _chat_jsonl(path: Path, n: int = 60) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Расскажи, пожалуйста, о городе номер {i} и его истории."},
            {"role": "assistant", "content": f"Город номер {i} основан давно; в нём есть река, мост и старый рынок."},
        ]}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- options ---------------------------------------------------------------------------------------------

def test_options_parse_and_validate() -> None:
    assert EXL2Options(bits="6.5, 4.0,5.0").bits == [4.0, 5.0, 6.5]
    assert EXL2Options().head_bits == 6
    for bad in ({"bits": "9"}, {"bits": "1.5"}, {"bits": "four"}, {"head_bits": 7}, {"bits": ""}):
        with pytest.raises(ValueError):
            EXL2Options(**bad)
    assert [bits_name(b) for b in (4.0, 6.5, 4.125, 8)] == ["4.0bpw", "6.5bpw", "4.125bpw", "8.0bpw"]


def test_parse_status_lines() -> None:
    line = '[STATUS]{"stage": "Measuring", "completion": 0.25}[/STATUS]\n'
    assert parse_status(line) == {"stage": "Measuring", "completion": 0.25}
    assert parse_status(" -- Layer: model.layers.0 (Attention)") is None
    assert parse_status("[STATUS]not json[/STATUS]") is None


def test_converter_arguments(tmp_path: Path, llama31_ckpt: Path) -> None:
    ctx = _ctx(llama31_ckpt, tmp_path / "ws")
    st = settings(ctx, EXL2Options(rows=8, length=256, measure_length=512))
    common = dict(source=tmp_path / "src", work=tmp_path / "w", parquet=tmp_path / "c.parquet", st=st, head_bits=6)
    meas = converter_args(**common, measurement_out=tmp_path / "w" / "measurement.json")  # type: ignore[arg-type]
    assert meas[meas.index("-om") + 1].endswith("measurement.json")
    assert "-cf" not in meas and "-m" not in meas and "-so" in meas  # -om and -cf conflict in the converter
    assert meas[meas.index("-mr") + 1] == "8" and meas[meas.index("-ml") + 1] == "512"
    conv = converter_args(**common, measurement=tmp_path / "m.json", output=tmp_path / "out",  # type: ignore[arg-type]
                          bits=4.0, shard_size=2048)
    for flag, value in (("-b", "4"), ("-hb", "6"), ("-r", "8"), ("-l", "256"), ("-ss", "2048"),
                        ("-m", str(tmp_path / "m.json")), ("-cf", str(tmp_path / "out")), ("-i", str(tmp_path / "src")),
                        ("-o", str(tmp_path / "w")), ("-c", str(tmp_path / "c.parquet"))):
        assert conv[conv.index(flag) + 1] == value
    assert "-om" not in conv


# -- plan ------------------------------------------------------------------------------------------------

def test_plan_lists_steps_folders_sizes_and_tokens(tmp_path: Path, llama31_ckpt: Path) -> None:
    ctx = _ctx(llama31_ckpt, tmp_path / "ws", calib_samples=32, calib_seq_len=256)
    steps = list(_steps(ctx, EXL2Options(bits="4.0,6.5", head_bits=8)).values())
    assert [s.key for s in steps] == ["exl2/calibrate", "exl2/measure", "exl2/quantize/4.0bpw",
                                      "exl2/quantize/6.5bpw", "exl2/verify/4.0bpw", "exl2/verify/6.5bpw"]
    assert [s.outputs[0] for s in steps[:4]] == ["exl2/calibration.parquet", "exl2/measurement.json",
                                                 "exl2/4.0bpw/", "exl2/6.5bpw/"]
    assert not any(s.done for s in steps) and all(s.resources.gpus == 1.0 for s in steps[1:])
    cal = dict(steps[0].extra)
    assert cal["tokens_needed"] == 32 * 256
    texts_tokens = cal["tokens_present"]
    assert texts_tokens > 32 * 256 and f"{texts_tokens:,}" in steps[0].title and cal["problem"] is None

    # size: linear weights at the bitrate, head at its bits, embeddings and norms in fp16
    ckpt = ctx.checkpoint
    lin = head = other = 0
    for name, info in ckpt.tensors.tensors.items():
        n = math.prod(info.shape)
        if name.endswith("lm_head.weight"):
            head += n
        elif name.endswith("embed_tokens.weight") or len(info.shape) == 1:
            other += n
        else:
            lin += n
    for step, bits in zip(steps[2:4], (4.0, 6.5), strict=True):
        assert dict(step.extra)["bits"] == bits
        expected = lin * bits / 8 + head * HEAD_BPW[8] / 8 + other * 2
        assert step.estimated_size == pytest.approx(expected, rel=1e-6)
    assert steps[3].estimated_size > steps[2].estimated_size
    assert not (tmp_path / "ws" / "exl2" / "calibration.parquet").exists()  # a plan writes nothing


def test_plan_says_when_tokens_are_too_few(tmp_path: Path, llama31_ckpt: Path) -> None:
    ctx = _ctx(llama31_ckpt, tmp_path / "ws")
    cal = _steps(ctx, EXL2Options(bits="4.0", rows=1000, length=2048))["exl2/calibrate"]
    extra = dict(cal.extra)
    assert extra["tokens_needed"] == 2_048_000 and extra["tokens_present"] < 2_048_000
    assert "too few" in cal.title and "2,048,000" in extra["problem"]


# -- calibration parquet ---------------------------------------------------------------------------------

def test_parquet_is_chat_formatted_and_counted(tmp_path: Path, llama31_ckpt: Path, fake_converter: Path) -> None:
    calib = _chat_jsonl(tmp_path / "chat.jsonl")
    ctx = _ctx(llama31_ckpt, tmp_path / "ws", calibration=str(calib))
    tok = _tokenizer(llama31_ckpt)
    make(ctx, "exl2", EXL2Options(bits="4.0", rows=16, length=128), only={"exl2/calibrate"})
    path = ctx.workspace.root / "exl2" / "calibration.parquet"
    texts = read_parquet_texts(path)
    rec = Workspace(ctx.workspace.root).steps["exl2/calibrate"]
    assert len(texts) == 60 and rec["info"]["documents"] == 60 and rec["info"]["chat"]
    assert all("<|start_header_id|>user<|end_header_id|>" in t for t in texts)  # the instruct model's template
    assert rec["info"]["tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert rec["outputs"] == ["exl2/calibration.parquet"]

    mtime = path.stat().st_mtime_ns
    make(ctx, "exl2", EXL2Options(bits="4.0", rows=16, length=128), only={"exl2/calibrate"})  # reused
    assert path.stat().st_mtime_ns == mtime


def test_too_few_tokens_fails_before_any_gpu_work(tmp_path: Path, llama31_ckpt: Path, fake_converter: Path) -> None:
    calib = _chat_jsonl(tmp_path / "chat.jsonl", n=10)
    ctx = _ctx(llama31_ckpt, tmp_path / "ws", calibration=str(calib))
    with pytest.raises(QuantkitError) as err:
        _run(ctx, EXL2Options(bits="4.0", rows=64, length=512))
    msg = str(err.value)
    assert "32,768" in msg and "tokens" in msg and "--rows" in msg
    assert not (ctx.workspace.root / "exl2").exists() and not _calls(fake_converter)


# -- the config fix --------------------------------------------------------------------------------------

def test_source_config_gets_top_level_rope_theta(tmp_path: Path, qwen2_ckpt: Path) -> None:
    original = json.loads((qwen2_ckpt / "config.json").read_text())
    assert "rope_theta" not in original and original["rope_parameters"]["rope_theta"] == 1_000_000.0  # transformers 5
    ckpt = load_local(qwen2_ckpt, name="q", source=str(qwen2_ckpt))
    src = prepare_source(ckpt, tmp_path / "source")
    config = json.loads((src / "config.json").read_text())
    assert config["rope_theta"] == 1_000_000.0
    assert "rope_scaling" not in config  # default RoPE: nothing to scale
    assert config["rope_parameters"] == original["rope_parameters"]
    names = sorted(p.name for p in src.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names and "README.md" not in names
    assert (src / "model.safetensors").resolve() == (qwen2_ckpt / "model.safetensors").resolve()
    assert (src / "tokenizer.json").read_bytes() == (qwen2_ckpt / "tokenizer.json").read_bytes()


def test_source_config_gets_rope_scaling_for_llama31(tmp_path: Path, llama31_ckpt: Path) -> None:
    ckpt = load_local(llama31_ckpt, name="l", source=str(llama31_ckpt))
    config = json.loads((prepare_source(ckpt, tmp_path / "source") / "config.json").read_text())
    assert config["rope_theta"] == 500_000.0
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


def test_fix_config_keeps_existing_values_and_drops_disabled_window() -> None:
    old = {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert fix_config(old) == old  # a transformers 4 config is left alone
    assert fix_config({"sliding_window": 131072, "use_sliding_window": False})["sliding_window"] is None
    assert fix_config({"sliding_window": 4096})["sliding_window"] == 4096


def test_output_config_is_fixed_too(tmp_path: Path, llama31_ckpt: Path) -> None:
    config = json.loads((llama31_ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl2", "bits": 4.0, "head_bits": 6}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    fix_config_file(path)
    fixed = json.loads(path.read_text())
    assert fixed["rope_theta"] == 500_000.0 and fixed["rope_scaling"]["rope_type"] == "llama3"
    assert fixed["quantization_config"]["quant_method"] == "exl2"


# -- reuse and resume ------------------------------------------------------------------------------------

def _fake_exl2_folder(folder: Path, bits: float) -> None:
    """What a finished conversion leaves (the converter itself needs CUDA)."""
    folder.mkdir(parents=True)
    (folder / "output.safetensors").write_bytes((8).to_bytes(8, "little") + b"{}      ")  # a valid, empty file
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl2", "bits": bits}}))


def test_measurement_with_same_fingerprint_is_reused(tmp_path: Path, llama31_ckpt: Path,
                                                     fake_converter: Path) -> None:
    ctx = _ctx(llama31_ckpt, tmp_path / "ws", calib_samples=16, calib_seq_len=256)
    opts = EXL2Options(bits="4.0")
    _run(ctx, opts)
    assert len(_calls(fake_converter)) == 2  # one measurement, one conversion
    steps = _steps(ctx, opts)
    assert all(s.done for k, s in steps.items() if "verify" not in k)
    # another measurement length is another measurement; head bits and bitrate change only the conversion
    other = _steps(ctx, EXL2Options(bits="4.0", measure_length=512))
    assert other["exl2/measure"].fingerprint != steps["exl2/measure"].fingerprint
    assert _steps(ctx, EXL2Options(bits="5.0", head_bits=8))["exl2/measure"].fingerprint == \
        steps["exl2/measure"].fingerprint
    assert _steps(ctx, EXL2Options(bits="4.0", head_bits=8))["exl2/quantize/4.0bpw"].fingerprint != \
        steps["exl2/quantize/4.0bpw"].fingerprint
    # a new bitrate reuses the measurement
    _run(ctx, EXL2Options(bits="4.0,5.0"))
    calls = _calls(fake_converter)
    assert len(calls) == 3 and "-m" in calls[2]["argv"] and "-om" not in calls[2]["argv"]


def test_finished_bitrate_is_skipped_and_recorded(tmp_path: Path, llama31_ckpt: Path, fake_converter: Path) -> None:
    """With measurement and 4.0 bpw done, a run does no GPU work and keeps the artifact's record."""
    ctx = _ctx(llama31_ckpt, tmp_path / "ws", calib_samples=16, calib_seq_len=256, command="quantkit exl2 x")
    opts = EXL2Options(bits="4.0")
    [art] = _run(ctx, opts)
    final = ctx.workspace.root / "exl2" / "4.0bpw"
    assert art.quant == "4.0bpw" and art.path == final and art.bpw == 4.0
    assert art.size == sum(p.stat().st_size for p in final.iterdir())
    ws = Workspace(ctx.workspace.root)
    entry = ws.artifacts["exl2/4.0bpw"]
    fp = ws.steps["exl2/quantize/4.0bpw"]["fingerprint"]
    assert entry["format"] == "exl2" and entry["fingerprint"] == fp and entry["command"] == "quantkit exl2 x"
    assert entry["calibration"]["tokens"] == ws.steps["exl2/calibrate"]["info"]["tokens"]
    assert entry["calibration"]["rows"] == 16 and entry["calibration"]["parquet"] == "exl2/calibration.parquet"
    assert "exllamav2" in entry["tools"] and entry["tools"]["quantkit"]
    assert {"exl2/4.0bpw/config.json", "exl2/4.0bpw/output.safetensors"} <= set(entry["files"]) == set(
        entry["sha256"])

    (ws.root / "exl2" / "measurement.json").unlink()  # not needed again: every bitrate is finished
    status = {k: s.status for k, s in _steps(ctx, opts).items()}
    assert status["exl2/measure"] == "not needed" and status["exl2/quantize/4.0bpw"] == "done"
    [again] = _run(ctx, opts)
    assert again.path == final and len(_calls(fake_converter)) == 2  # no GPU work
    assert Workspace(ws.root).steps["exl2/quantize/4.0bpw"]["finished"] == ws.steps["exl2/quantize/4.0bpw"][
        "finished"]


def test_resume_decisions(tmp_path: Path) -> None:
    work, partial = tmp_path / "work" / "4.0bpw", tmp_path / ".4.0bpw.partial"
    assert work_state(work, "fp1", False) == "new"  # nothing there

    reset_work(work, "fp1", partial)
    assert work.is_dir() and work_state(work, "fp1", False) == "new"  # stamped, but the converter has not started
    (work / "job_new.json").write_text(json.dumps({"progress": "quant", "bits": 4.0}))
    (work / "out_tensor").mkdir()
    assert work_state(work, "fp1", False) == "resume"  # an unfinished job of the same inputs: same -o resumes it
    assert work_state(work, "fp2", False) == "new"  # other inputs: start afresh

    (work / "job_new.json").write_text(json.dumps({"progress": "finished"}))
    assert work_state(work, "fp1", False) == "new"  # finished, but its output is gone
    _fake_exl2_folder(partial, 4.0)
    assert output_complete(partial)
    assert work_state(work, "fp1", output_complete(partial)) == "finished"  # only the rename is left

    (work / "job_new.json").write_text(json.dumps({"progress": "quant", "invalid": True}))
    assert work_state(work, "fp1", False) == "new"  # the converter marks a corrupt job
    reset_work(work, "fp2", partial)
    assert list(work.iterdir()) == [] and not partial.exists()
    partial.mkdir()
    (partial / "output_temp_1.safetensors").write_bytes(b"")
    assert not output_complete(partial)


def test_owns(tmp_path: Path, llama31_ckpt: Path) -> None:
    backend = EXL2Backend()
    folder = tmp_path / "4.0bpw"
    _fake_exl2_folder(folder, 4.0)
    assert backend.owns(folder)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "output.safetensors").write_bytes(b"")
    assert not backend.owns(raw)
    (raw / "measurement.json").write_text("{}")
    assert backend.owns(raw)
    assert not backend.owns(llama31_ckpt) and not backend.owns(folder / "config.json")


# -- the whole run against a stand-in for exllamav2's converter ----------------------------------------------

FAKE_CONVERTER = r"""
# A stand-in for exllamav2.conversion.convert_exl2 (which needs CUDA): same arguments, job_new.json resume,
# [STATUS] lines, silent exit 0 when stopped, -om measurement, -cf output folder with the source's files.
import argparse, json, os, shutil, sys

p = argparse.ArgumentParser()
for flag in ("-i", "-o", "-cf", "-c", "-om", "-m"):
    p.add_argument(flag)
for flag, kind, default in (("-b", float, 4.125), ("-ss", float, 8192), ("-hb", int, 6), ("-r", int, 100),
                            ("-mr", int, 16), ("-l", int, 2048), ("-ml", int, 2048)):
    p.add_argument(flag, type=kind, default=default)
p.add_argument("-so", action="store_true")
a = p.parse_args()
job_file = os.path.join(a.o, "job_new.json")
resumed = os.path.exists(job_file)
new = {"in_dir": a.i, "cf": a.cf, "om": a.om, "bits": a.b, "progress": "begin"}
job = json.load(open(job_file)) if resumed else new
with open(os.environ["FAKE_EXL2_CALLS"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "resumed": resumed}) + "\n")
cfg = json.load(open(os.path.join(job["in_dir"], "config.json")))
if "rope_theta" not in cfg or not os.path.exists(a.c) or not (a.om or a.m):
    print(" ## Error: bad input")
    sys.exit()
def save():
    json.dump(job, open(job_file, "w"))
for stage in (["Measuring"] if job["om"] else ["Optimizing", "Quantizing", "Compiling"]):
    if job.get("done " + stage):
        continue
    print("[STATUS]" + json.dumps({"stage": stage, "completion": 0.5}) + "[/STATUS]", flush=True)
    if stage == os.environ.get("FAKE_EXL2_STOP_AT"):
        job["progress"] = stage
        save()
        print(" ** Error: out of memory")
        sys.exit()
    job["done " + stage] = True
    save()
if job["om"]:
    for f in (os.path.join(a.o, "measurement.json"), job["om"]):
        json.dump({"measurement": {}, "last_module_idx": 3}, open(f, "w"))
else:
    os.makedirs(job["cf"], exist_ok=True)
    open(os.path.join(job["cf"], "output.safetensors"), "wb").write((8).to_bytes(8, "little") + b"{}      ")
    for f in os.listdir(job["in_dir"]):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(job["in_dir"], f), os.path.join(job["cf"], f))
    cfg["quantization_config"] = {"quant_method": "exl2", "bits": job["bits"], "head_bits": a.hb}
    json.dump(cfg, open(os.path.join(job["cf"], "config.json"), "w"))
    print(" -- Module quantized, calibration perplexity (quant): 12.3456")
job["progress"] = "finished"
save()
"""


@pytest.fixture
def fake_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a stand-in `exllamav2` first on the path (here and in subprocesses) and report a GPU: the converter
    and torch's device query are the only things replaced; quantkit runs as it is."""
    import importlib

    import torch
    root = tmp_path / "fake-exllamav2"
    (root / "exllamav2" / "conversion").mkdir(parents=True)
    (root / "exllamav2" / "__init__.py").write_text("")
    (root / "exllamav2" / "conversion" / "convert_exl2.py").write_text(FAKE_CONVERTER)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_EXL2_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    importlib.invalidate_caches()
    return tmp_path / "calls.jsonl"


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_run_measures_once_converts_each_bitrate_and_resumes(tmp_path: Path, llama31_ckpt: Path,
                                                             fake_converter: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _ctx(llama31_ckpt, tmp_path / "ws", calib_samples=16, calib_seq_len=256)
    backend = EXL2Backend()
    assert backend.check() is None
    root = ctx.workspace.root / "exl2"

    arts = _run(ctx, EXL2Options(bits="4.0,5.0", head_bits=8))
    calls = _calls(fake_converter)
    assert len(calls) == 3  # one measurement, then one conversion per bitrate reusing it
    assert "-om" in calls[0]["argv"] and all("-m" in c["argv"] and "-om" not in c["argv"] for c in calls[1:])
    assert all(c["argv"][c["argv"].index("-m") + 1] == str(root / "measurement.json") for c in calls[1:])
    assert [a.quant for a in arts] == ["4.0bpw", "5.0bpw"]
    for art, bits in zip(arts, (4.0, 5.0), strict=True):
        assert art.path == root / bits_name(bits) and backend.owns(art.path)
        config = json.loads((art.path / "config.json").read_text())
        assert config["quantization_config"]["bits"] == bits and config["quantization_config"]["head_bits"] == 8
        assert config["rope_theta"] == 500_000.0 and config["rope_scaling"]["rope_type"] == "llama3"
        assert (art.path / "tokenizer.json").exists() and not (art.path / "README.md").exists()
        assert art.info["calibration_perplexity"] == pytest.approx(12.3456)
    assert (root / "measurement.json").exists() and (root / "source" / "config.json").exists()
    assert not (root / "work" / "measurement").exists() and not (root / "work" / "4.0bpw").exists()
    assert not list(root.glob(".*.partial"))
    assert (root / "logs" / "measurement.log").read_text().count("[STATUS]") == 1
    manifest = Workspace(ctx.workspace.root)
    assert {"exl2/calibrate", "exl2/measure", "exl2/quantize/4.0bpw", "exl2/quantize/5.0bpw"} <= set(manifest.steps)
    assert set(manifest.artifacts) >= {"exl2/4.0bpw", "exl2/5.0bpw"}

    # a rerun does nothing; a new bitrate reuses the measurement
    _run(ctx, EXL2Options(bits="4.0,5.0", head_bits=8))
    assert len(_calls(fake_converter)) == 3

    # a conversion that stops half way (the converter exits 0) is an error, and the next run resumes it
    monkeypatch.setenv("FAKE_EXL2_STOP_AT", "Quantizing")
    with pytest.raises(QuantkitError, match="did not finish: Error: out of memory"):
        _run(ctx, EXL2Options(bits="4.0,6.0", head_bits=8))
    assert not (root / "6.0bpw").exists() and (root / "work" / "6.0bpw" / "job_new.json").exists()
    monkeypatch.delenv("FAKE_EXL2_STOP_AT")
    [_, six] = _run(ctx, EXL2Options(bits="4.0,6.0", head_bits=8))
    calls = _calls(fake_converter)
    assert len(calls) == 5 and not calls[3]["resumed"] and calls[4]["resumed"]
    assert calls[4]["argv"][calls[4]["argv"].index("-o") + 1] == str(root / "work" / "6.0bpw")
    assert six.path == root / "6.0bpw" and json.loads((six.path / "config.json").read_text())[
        "quantization_config"]["bits"] == 6.0

    # other head bits: same measurement, new conversions replacing the old folders
    _run(ctx, EXL2Options(bits="4.0", head_bits=6))
    calls = _calls(fake_converter)
    assert len(calls) == 6 and "-m" in calls[5]["argv"]
    assert json.loads((root / "4.0bpw" / "config.json").read_text())["quantization_config"]["head_bits"] == 6


# -- the CLI on a machine without CUDA -------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_check_names_the_missing_gpu() -> None:
    reason = get_backend("exl2").check()
    assert reason is not None and "NVIDIA GPU with CUDA" in reason and "\n" not in reason


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_in_one_line_and_dry_run_shows_the_plan(tmp_path: Path, llama31_ckpt: Path) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    ws = tmp_path / "ws"
    run = subprocess.run([str(QUANTKIT), "exl2", str(llama31_ckpt), "--bits", "4.0", "--workspace", str(ws)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "EXL2 needs an NVIDIA GPU with CUDA" in lines[0]
    assert not (ws / "exl2").exists()

    dry = subprocess.run([str(QUANTKIT), "exl2", str(llama31_ckpt), "--bits", "4.0,5.0", "--workspace", str(ws),
                          "--dry-run", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr
    summary = json.loads(dry.stdout)
    assert summary["dry_run"] and not summary["can_run_here"] and "CUDA" in summary["reason"]
    steps = [s for s in summary["plan"] if str(s.get("output") or "").startswith("exl2/")]  # the backend's own steps
    assert [s["output"] for s in steps] == ["exl2/calibration.parquet", "exl2/measurement.json", "exl2/4.0bpw/",
                                            "exl2/5.0bpw/"]
    assert steps[0]["tokens_needed"] == 64 * 512

    human = subprocess.run([str(QUANTKIT), "exl2", str(llama31_ckpt), "--bits", "4.0", "--workspace", str(ws),
                            "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert human.returncode == 0, human.stderr
    assert "Plan for" in human.stdout and "4.0bpw" in human.stdout and "cannot run here" in human.stdout


def test_backends_command_lists_exl2_with_its_reason() -> None:
    out = subprocess.run([str(QUANTKIT), "backends", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = next(r for r in json.loads(out.stdout) if r["name"] == "exl2")
    assert row["description"] == EXL2Backend.description
    if HAS_CUDA:
        assert row["available"] or "exllamav2" in row["reason"]
    else:
        assert not row["available"] and "NVIDIA GPU with CUDA" in row["reason"]


# -- CUDA: the real thing --------------------------------------------------------------------------------

def _perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(targets)), targets].mean()))


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="EXL2 needs an NVIDIA GPU with CUDA")
def test_exl2_end_to_end_cuda(tmp_path: Path, llama3_ckpt: Path) -> None:
    """Fixture model → measurement → 4.0 bpw → loads in exllamav2 → perplexity close to bf16; a rerun skips."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.calibration import load

    ctx = _ctx(llama3_ckpt, tmp_path / "ws", calib_samples=16, calib_seq_len=512)
    backend = EXL2Backend()
    assert backend.check() is None
    [art] = _run(ctx, EXL2Options(bits="4.0"), verify=True)
    assert art.path == ctx.workspace.root / "exl2" / "4.0bpw" and backend.owns(art.path)
    assert (ctx.workspace.root / "exl2" / "measurement.json").exists()
    assert not (ctx.workspace.root / "exl2" / "work" / "4.0bpw").exists()
    config = json.loads((art.path / "config.json").read_text())
    assert config["rope_theta"] == 500_000.0 and config["quantization_config"]["quant_method"] == "exl2"
    assert art.size > 0 and any(p.name.startswith("output") for p in art.files)

    tok = _tokenizer(llama3_ckpt)
    text = "\n\n".join(d.plain() for d in load("builtin:ru-eval").documents)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n_ctx, first = 512, 256
    chunks = [ids[i:i + n_ctx] for i in range(0, min(len(ids), 8 * n_ctx) - n_ctx + 1, n_ctx)]
    assert chunks

    ref = AutoModelForCausalLM.from_pretrained(str(llama3_ckpt), dtype=torch.float32).cuda().eval()
    scorer = backend.scorer(art.path, n_ctx=n_ctx)
    try:
        assert scorer.n_vocab == ref.config.vocab_size
        ppl_q, ppl_ref = [], []
        for chunk in chunks:
            q = scorer.chunk_logits(chunk, first)
            assert q.dtype == np.float32 and q.shape == (n_ctx - first, scorer.n_vocab)
            with torch.no_grad():
                r = ref(torch.from_numpy(chunk)[None].cuda()).logits[0, first:].float().cpu().numpy()
            targets = chunk[first + 1:]
            ppl_q.append(_perplexity(q[:-1], targets))
            ppl_ref.append(_perplexity(r[:-1], targets))
    finally:
        scorer.close()
    ratio = float(np.exp(np.mean(np.log(ppl_q)) - np.mean(np.log(ppl_ref))))
    assert ratio < 1.10, (ppl_q, ppl_ref)

    mtime = (art.path / "config.json").stat().st_mtime_ns
    [again] = _run(ctx, EXL2Options(bits="4.0"), verify=True)  # everything done: skipped
    assert again.path == art.path and (art.path / "config.json").stat().st_mtime_ns == mtime
