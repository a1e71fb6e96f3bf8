"""The child process that runs GPTQModel (``python -m quantkit.backends.gptq JOB.json``): GPTQModel prints to
stdout and patches libraries at import, so it never runs in quantkit's own process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _worker(job_path: str) -> None:
    """Quantize with GPTQModel (GPTQ or AWQ) as `job_path` says (run in a child process by `GPTQBackend._quantize`)."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from gptqmodel import GPTQModel, QuantizeConfig

    rows = np.load(job["rows"])
    calibration = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in rows]
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    offload = {"offload_to_disk": True, "offload_to_disk_path": job["offload"]}
    extra: dict = {}
    if job.get("method", "gptq") == "awq":
        from gptqmodel import BACKEND
        from gptqmodel.quantization.config import FORMAT, METHOD

        qcfg = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], sym=not job["zero_point"],
                              quant_method=METHOD.AWQ, format=FORMAT.GEMM, **offload)
        if device == "cpu":  # GPTQModel's default AWQ kernel needs CUDA; its torch kernel runs anywhere
            extra["backend"] = BACKEND.AWQ_TORCH
    else:
        qcfg = QuantizeConfig(
            bits=job["bits"], group_size=job["group_size"], desc_act=job["desc_act"], sym=job["sym"],
            damp_percent=job["damp"], format="gptq", pack_impl="original",
            # GPTQModel's default "group-aware reordering" conflicts with act-order and needs groups
            act_group_aware=not job["desc_act"] and job["group_size"] > 0, **offload,
        )
    model = GPTQModel.load(job["source"], qcfg, device=device)
    model.quantize(calibration, batch_size=1, **extra)
    model.save(job["output"])


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m quantkit.backends.gptq JOB.json")
    _worker(argv[1])
