"""What the card and the publish layout say about EXL2: each bitrate on its own branch, ``measurement.json`` and the
card on ``main``, ExLlamaV2 / TabbyAPI usage, and offline size estimates."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from quantkit.backends.base import (
    COMPLETION,
    PROMPT,
    CardContext,
    Entries,
    FormatInfo,
    calibration_summary,
)
from quantkit.backends.branches import FolderPerBranch
from quantkit.backends.exl2.options import bits_name
from quantkit.workspace import Workspace


class EXL2Sections(FolderPerBranch):
    """EXL2's format knowledge (`EXL2Backend` subclasses it); advice is the generic bits-per-weight one."""

    name = "exl2"
    main_branch_variant = False  # every bitrate on its branch; main keeps the card and measurement.json
    publish_skip: ClassVar[frozenset[str]] = frozenset({"job_new.json", "job.json", "out_tensor"})  # converter progress

    def format_info(self) -> FormatInfo:
        return FormatInfo(title="EXL2", library="exllamav2", tag="exl2", repo_suffix="EXL2",
                          runtimes="ExLlamaV2 and TabbyAPI (NVIDIA GPUs)",
                          calibrated="The EXL2 measurement and quantization were calibrated on Russian text",
                          choose_hint=" Higher bitrates need more VRAM and lose less.")

    def card_usage(self, ctx: CardContext) -> str:
        return usage(ctx.model_name, ctx.repo, ctx.branch, ctx.instruct)

    def card_provenance(self, ws: Workspace, arts: Entries) -> list[str]:
        if not (ws.root / "exl2" / "measurement.json").is_file():
            return []
        return ["- **Measurement:** `measurement.json` on `main`; pass it to ExLlamaV2's `convert.py -m` to "
                "make other bitrates without measuring again."]

    def shared_files(self, ws: Workspace) -> dict[str, str]:
        return {"measurement.json": "measurement.json"}

    def estimate_steps(self, options: BaseModel, n_params: int | None, settings: Any,
                       model: str) -> list[dict[str, Any]]:
        calib = calibration_summary(settings)
        steps: list[dict[str, Any]] = [
            {"step": f"calibration parquet from {calib}", "output": "exl2/calibration.parquet", "estimated_size": None},
            {"step": "measurement, reused by every bitrate", "output": "exl2/measurement.json",
             "estimated_size": None},
        ]
        for b in options.bits:  # type: ignore[attr-defined]
            steps.append({"step": f"quantize {bits_name(b)[:-3]} bpw (head {options.head_bits} bits)",  # type: ignore
                          "output": f"exl2/{bits_name(b)}/",
                          "estimated_size": int(n_params * (b + 0.1) / 8) if n_params else None})
        return [{**s, "done": False} for s in steps]


def usage(model: str, repo: str, branch: str, instruct: bool) -> str:
    """Downloading one bitrate, loading it in ExLlamaV2 and serving it with TabbyAPI."""
    folder = f"{model}-{branch}"
    if instruct:
        call = (
            "# format the chat with the model's own template (shipped with the files)\n"
            f'chat = AutoTokenizer.from_pretrained("{folder}")\n'
            f'prompt = chat.apply_chat_template([{{"role": "user", "content": "{PROMPT}"}}],\n'
            "                                   tokenize=False, add_generation_prompt=True)\n"
            "print(generator.generate(prompt=prompt, max_new_tokens=256, add_bos=False, encode_special_tokens=True,\n"
            "                         stop_conditions=[tokenizer.eos_token_id], completion_only=True))"
        )
        imports = "from transformers import AutoTokenizer\n"
    else:
        call = f'print(generator.generate(prompt="{COMPLETION}", max_new_tokens=128))'
        imports = ""
    return f"""Each bitrate lives in its own branch; `main` holds this card and `measurement.json`.
Download one bitrate:

```bash
hf download {repo} --revision {branch} --local-dir {folder}
# or, with an older huggingface_hub: huggingface-cli download {repo} --revision {branch} --local-dir {folder}
```

**ExLlamaV2**:

```python
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.generator import ExLlamaV2DynamicGenerator
{imports}
config = ExLlamaV2Config("{folder}")
model = ExLlamaV2(config)
cache = ExLlamaV2Cache(model, max_seq_len=4096, lazy=True)
model.load_autosplit(cache)
tokenizer = ExLlamaV2Tokenizer(config)
generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer)
{call}
```

**TabbyAPI**: put the `{folder}` folder into TabbyAPI's `models/` directory and set
`model_name: {folder}` in `config.yml` (or load it through the API); it serves an OpenAI-compatible endpoint."""
